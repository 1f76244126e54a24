import subprocess
import sys

import pytest
import torch

from bmojo.bench import ops as bench_ops


def test_quick_run_prints_rows_verdicts_and_a_json_line(bench, json_line):
    code, out = bench(["ops", "--quick", "--json"])
    doc = json_line(out)
    assert code == 0
    assert set(doc) == {"config", "results", "verdicts"}
    assert doc["config"]["lengths"] == [64, 128] and doc["config"]["repeats"] == 1
    assert doc["config"]["device"] == "cpu" and doc["config"]["threads"] >= 1
    ops = {r["op"] for r in doc["results"]}
    assert ops == {"ssd chunk=64", "attn W=256 F=256 M=64", "attn W=256 F=0 M=0", "attn causal",
                   "swa W=64 dispatch", "conv K=4"}
    assert len(doc["results"]) == len(ops) * len(bench_ops.MODES) * 2
    for r in doc["results"]:
        assert r["skipped"] is None and r["ratio"] > 0
        assert r["baseline"]["median_ms"] > 0 and r["fast"]["median_ms"] > 0
    assert len(doc["verdicts"]) == 2 and all("not measured" in v for v in doc["verdicts"])  # L=1024 not run
    assert "baseline ms" in out
    assert "triton: not timed (the Triton kernels run on CUDA, not timed on cpu)" in out


@pytest.mark.parametrize(("flags", "message"), [
    (["--lengths", "64,x"], "--lengths: expected comma-separated integers"),
    (["--lengths", "0"], "--lengths: every value must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_bad_input_is_a_one_line_value_error(bench, flags, message):
    with pytest.raises(ValueError) as err:
        bench(["ops", *flags])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_runs_as_a_module_without_the_bmojo_entry_point():
    result = subprocess.run([sys.executable, "-m", "bmojo.bench.ops", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--quick" in result.stdout and result.stderr == ""


def test_triton_cases_time_the_kernels_against_the_chunked_attention_on_the_same_inputs():
    """The GPU rows (built here on the CPU, where Triton's interpreter runs the kernels): both
    functions of each case give the same attention, in the case's dtype."""
    pytest.importorskip("triton")
    from bmojo.ops.attention_triton import INTERPRETED

    if not INTERPRETED:
        pytest.skip("on CUDA the bench run itself times these cases")
    cases = bench_ops.triton_attention_cases(1, 300, torch.float32)  # past W = 256: every key set
    assert [c.op for c in cases] == ["triton W=256 F=256 M=64 fp32", "triton W=256 F=0 M=0 fp32"]
    for case in cases:
        torch.testing.assert_close(case.fast(**case.kwargs), case.baseline(**case.kwargs), atol=1e-5, rtol=1e-4)
    assert all(t.dtype == torch.bfloat16 for t in bench_ops.triton_attention_cases(1, 16, torch.bfloat16)[0]
               .kwargs.values() if isinstance(t, torch.Tensor) and t.is_floating_point())


def test_triton_ssd_case_times_the_kernels_against_the_pytorch_scan_on_the_same_inputs():
    pytest.importorskip("triton")
    from bmojo.ops.ssd_triton import INTERPRETED

    if not INTERPRETED:
        pytest.skip("on CUDA the bench run itself times this case")
    case = bench_ops.triton_ssd_case(1, 100, 64)  # two chunks of 64, the second padded
    assert case.op == "triton ssd chunk=64 fp32"
    assert case.fast.keywords == {"chunk_size": 64, "kernel": "triton"} and case.baseline.keywords == {"chunk_size": 64}
    (y, state), (y_ref, state_ref) = case.fast(**case.kwargs), case.baseline(**case.kwargs)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-4)
