import pytest
import torch
from torch._dynamo.utils import counters

from bmojo.bench import train as bench_train
from bmojo.bench.common import QUICK_SHAPES, run_interleaved
from bmojo.config import PRESETS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_run_prints_a_json_line_with_every_arch_length_and_precision(quick_train, json_line):
    code, out, _ = quick_train
    doc = json_line(out)
    assert code == 0
    assert doc["command"] == "bench train"
    assert doc["device"] == "cpu" and doc["torch"] == torch.__version__ and doc["threads"] >= 1
    settings = doc["settings"]
    assert settings["shapes"] == QUICK_SHAPES
    expected = {(a, p, n) for a in PRESETS for p in settings["precisions"] for n in settings["lengths"]}
    assert {(r["arch"], r["precision"], r["length"]) for r in doc["results"]} == expected
    assert set(doc["matmul_flops"]) == {"fp32", "bf16"}
    assert all(spread["median"] > 0 for spread in doc["matmul_flops"].values())
    for r in doc["results"]:
        assert 0 < r["tokens_per_s"]["min"] <= r["tokens_per_s"]["median"] <= r["tokens_per_s"]["max"]
        assert r["tokens_per_s"]["repeats"] == settings["repeats"]
        assert r["tokens_per_s"]["median"] == pytest.approx(r["batch"] * r["length"] / r["step_s"]["median"])
        assert r["peak_bytes"] > 0 and r["flops_per_step"] > 0
        assert r["achieved_flops"] > 0 and r["utilisation"] > 0 and r["ratio_to_transformer"] > 0


def test_transformer_is_the_reference_of_the_ratios(quick_train, json_line):
    results = json_line(quick_train[1])["results"]
    ratios = [r["ratio_to_transformer"] for r in results if r["arch"] == "transformer"]
    assert ratios == [1.0] * 4  # two precisions, two lengths


def test_models_are_matched_and_the_table_and_plot_are_written(quick_train, json_line):
    _, out, plot_dir = quick_train
    doc = json_line(out)
    params = [m["params"] for m in doc["models"].values()]
    assert max(params) < 1.5 * min(params)
    assert "tokens/s median [min-max]" in out and "x transf." in out
    png = plot_dir / bench_train.PLOT_FILE
    assert doc["plot"] == str(png) and png.read_bytes().startswith(PNG_MAGIC)


def test_architectures_run_interleaved_in_every_round(monkeypatch, bench, tmp_path):
    calls = []

    def recording_run_interleaved(runners, repeats, warmup, on_run=None):
        def recording(name, runner):
            def run():
                calls.append(name)
                return runner()
            return run
        return run_interleaved({n: recording(n, r) for n, r in runners.items()}, repeats, warmup, on_run)

    monkeypatch.setattr(bench_train, "run_interleaved", recording_run_interleaved)
    code, _ = bench(["train", "--quick", "--archs", "transformer,mamba2,swa", "--lengths", "16", "--precision",
                     "fp32", "--repeats", "3", "--warmup", "1", "--no-progress", "--plot-dir", str(tmp_path)])
    assert code == 0
    assert calls == ["transformer", "mamba2", "swa"] * 4  # one warm-up round, then three timed rounds


def test_qkv_conv_flag_reaches_the_models(bench, json_line, tmp_path):
    """``--qkv-conv 4`` benchmarks B'MOJO with its q, k, v convolution: K weights and a bias per channel more."""
    params = {}
    for width in (0, 4):
        code, out = bench(["train", "--quick", "--archs", "bmojo", "--qkv-conv", str(width), "--lengths", "16",
                           "--precision", "fp32", "--repeats", "1", "--json", "--no-progress",
                           "--plot-dir", str(tmp_path)])
        doc = json_line(out)
        assert code == 0 and doc["settings"]["shapes"]["qkv_conv"] == width
        params[width] = doc["models"]["bmojo"]["params"]
    shapes = QUICK_SHAPES
    channels = 3 * shapes["d_model"]  # q, k, v of every head (n_kv_heads = n_heads here)
    assert params[4] - params[0] == shapes["n_layers"] * channels * (4 + 1)


def test_without_transformer_the_ratio_is_not_available(bench, json_line, tmp_path):
    code, out = bench(["train", "--quick", "--archs", "swa", "--lengths", "16", "--precision", "fp32",
                       "--repeats", "1", "--json", "--no-progress", "--plot-dir", str(tmp_path)])
    assert code == 0
    assert json_line(out)["results"][0]["ratio_to_transformer"] is None
    assert " n/a " in out


@pytest.mark.parametrize(("flags", "message"), [
    (["--archs", "transformer,gpt"], "--archs: unknown value 'gpt'"),
    (["--archs", "swa,swa"], "--archs: 'swa,swa' names a value twice"),
    (["--lengths", "64,abc"], "--lengths: expected comma-separated integers"),
    (["--lengths", "0"], "--lengths: every value must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--precision", "fp16"], "--precision: unknown value 'fp16'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--qkv-conv", "-1"], "--qkv-conv must be >= 0"),
    (["--matmul-size", "0"], "--matmul-size must be >= 1"),
    (["--size", "laptop"], "--quick uses its own tiny shapes"),
    (["--n-heads", "3"], "invalid shapes: n_heads=3 is invalid"),
    (["--device", "tpu"], "--device: 'tpu' is not a torch device"),
    (["--device", "meta"], "cpu and cuda devices only"),
])
def test_bad_input_is_a_one_line_value_error(bench, tmp_path, flags, message):
    with pytest.raises(ValueError) as err:
        bench(["train", "--quick", "--no-progress", "--plot-dir", str(tmp_path), *flags])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_value_error(bench, tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench(["train", "--quick", "--device", "cuda", "--plot-dir", str(tmp_path)])


def test_unknown_size_is_a_value_error(bench, tmp_path):
    with pytest.raises(ValueError, match="--size: unknown size 'huge'"):
        bench(["train", "--size", "huge", "--plot-dir", str(tmp_path)])


@pytest.mark.requires_cxx
def test_compile_times_the_compiled_models(bench, json_line, tmp_path):
    torch.compiler.reset()
    counters.clear()
    code, out = bench(["train", "--quick", "--compile", "--archs", "transformer", "--lengths", "16", "--precision",
                       "fp32", "--repeats", "1", "--json", "--no-progress", "--plot-dir", str(tmp_path)])
    assert code == 0
    assert json_line(out)["settings"]["compile"] is True
    assert "models: torch.compile (inductor" in out
    assert counters["stats"]["unique_graphs"] > 0  # dynamo compiled the model's graphs


def test_compile_without_a_cxx_compiler_is_a_value_error(bench, monkeypatch, tmp_path):
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler():
        raise InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ValueError, match="--compile: torch.compile on CPU needs a C\\+\\+ compiler"):
        bench(["train", "--quick", "--compile", "--archs", "transformer", "--lengths", "16", "--no-progress",
               "--plot-dir", str(tmp_path)])


def test_both_kernels_time_each_arch_with_attention_or_ssd_twice(bench, json_line, tmp_path, count_calls):
    """``--kernel torch,triton``: B'MOJO once with PyTorch's ops and once with the Triton kernels of
    both the attention and the SSD (on the CPU through Triton's interpreter, tests/conftest.py);
    the Transformer (neither) once."""
    pytest.importorskip("triton")
    from bmojo.ops import attention_triton, ssd_triton

    count_calls(attention_triton, "_attention_forward")
    calls = count_calls(ssd_triton, "_scan_forward")
    code, out = bench(["train", "--quick", "--archs", "transformer,bmojo", "--lengths", "40", "--precision", "fp32",
                       "--repeats", "1", "--warmup", "0", "--kernel", "torch,triton", "--json",
                       "--no-progress", "--plot-dir", str(tmp_path)])
    doc = json_line(out)
    assert code == 0 and doc["settings"]["kernels"] == ["torch", "triton"]
    assert [r["arch"] for r in doc["results"]] == ["transformer", "bmojo", "bmojo+triton"]
    assert all(r["ratio_to_transformer"] > 0 for r in doc["results"])
    # the memory step and one timed step, per layer, in bmojo+triton only
    assert calls == {"_attention_forward": 2 * QUICK_SHAPES["n_layers"], "_scan_forward": 2 * QUICK_SHAPES["n_layers"]}
    assert "windowed attention and SSD: PyTorch ops and Triton kernels (label +triton)" in out


def test_triton_kernel_off_cuda_is_a_value_error(bench, tmp_path, triton_without_interpreter):
    with pytest.raises(ValueError, match="--kernel triton: the Triton kernels run on CUDA, this run's device is cpu"):
        bench(["train", "--quick", "--kernel", "triton", "--plot-dir", str(tmp_path)])
