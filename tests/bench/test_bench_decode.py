import pytest
import torch

from bmojo.bench import decode as bench_decode
from bmojo.bench.common import run_interleaved
from bmojo.config import PRESETS, ModelConfig
from bmojo.models.lm import LanguageModel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_run_prints_a_json_line_with_every_arch_and_context(quick_decode, json_line):
    code, out, plot_dir = quick_decode
    doc = json_line(out)
    assert code == 0
    assert doc["command"] == "bench decode"
    assert doc["device"] == "cpu" and doc["torch"] == torch.__version__ and doc["threads"] >= 1
    contexts = doc["settings"]["contexts"]
    assert {(r["arch"], r["context"]) for r in doc["results"]} == {(a, n) for a in PRESETS for n in contexts}
    for r in doc["results"]:
        for key in ("prefill_s", "decode_ms_per_token"):
            assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"]
            assert r[key]["repeats"] == doc["settings"]["repeats"]
        assert r["cache_bytes"] > 0
    assert "decode ms/token" in out
    png = plot_dir / bench_decode.PLOT_FILE
    assert doc["plot"] == str(png) and png.read_bytes().startswith(PNG_MAGIC)


def test_only_full_attention_caches_grow_with_the_context(quick_decode, json_line):
    results = json_line(quick_decode[1])["results"]
    short, long = sorted({r["context"] for r in results})
    cache = {(r["arch"], r["context"]): r["cache_bytes"] for r in results}
    for arch in PRESETS:
        if arch == "transformer":
            assert cache[arch, long] > cache[arch, short]
        else:
            assert cache[arch, long] == cache[arch, short]


@pytest.mark.parametrize("arch", ["transformer", "bmojo"])
def test_decoding_is_timed_after_the_cache_holds_the_context(monkeypatch, arch):
    config = ModelConfig.preset(arch, d_model=16, n_layers=1, n_heads=2, window=4, chunk_size=4,
                                eidetic_per_chunk=1, eidetic_capacity=2, d_state=4, ssm_headdim=8, vocab_size=11)
    model = LanguageModel(config).eval()
    prefilled, positions = [], []
    forward, step = model.forward, model.step

    def recording_forward(tokens, cache=None):
        prefilled.append((tokens.shape[1], cache.position))
        return forward(tokens, cache)

    def recording_step(token, cache):
        positions.append(cache.position)
        return step(token, cache)

    monkeypatch.setattr(model, "forward", recording_forward)
    monkeypatch.setattr(model, "step", recording_step)
    prompt = torch.randint(0, 11, (1, 10))
    prefill_s, per_token_s = bench_decode.make_decode_run(model, prompt, steps=3)()
    assert prefilled == [(10, 0)]  # one parallel prefill of the whole context into an empty cache
    assert positions == [10, 11, 12]  # then each decoding step with N, N+1, ... tokens in the cache
    assert prefill_s > 0 and per_token_s > 0


def test_every_context_and_architecture_runs_in_every_round(monkeypatch, bench, tmp_path):
    calls = []

    def recording_run_interleaved(runners, repeats, warmup, on_run=None):
        def recording(name, runner):
            def run():
                calls.append(name)
                return runner()
            return run
        return run_interleaved({n: recording(n, r) for n, r in runners.items()}, repeats, warmup, on_run)

    monkeypatch.setattr(bench_decode, "run_interleaved", recording_run_interleaved)
    code, _ = bench(["decode", "--quick", "--archs", "mamba2,transformer", "--contexts", "8,12", "--repeats", "2",
                     "--warmup", "0", "--no-progress", "--plot-dir", str(tmp_path)])
    assert code == 0
    # not all of one context's runs, then all of the next one's: a drifting machine moves every context alike
    assert calls == [(8, "mamba2"), (8, "transformer"), (12, "mamba2"), (12, "transformer")] * 2


def test_latency_ratio_to_the_shortest_context_pairs_runs_of_the_same_round(monkeypatch, bench, json_line, tmp_path):
    # per-token seconds by round: N=8 takes 1, 2, 4 s; N=12 takes 4, 2, 6 s -> per-round ratios 4, 1, 1.5, median
    # 1.5 (the ratio of the medians would be 4 / 2 = 2)
    per_token = {8: iter([1.0, 2.0, 4.0]), 12: iter([4.0, 2.0, 6.0])}

    def fake_decode_run(model, prompt, steps):
        return lambda: (0.5, next(per_token[prompt.shape[1]]))

    monkeypatch.setattr(bench_decode, "make_decode_run", fake_decode_run)
    code, out = bench(["decode", "--quick", "--archs", "mamba2", "--contexts", "8,12", "--repeats", "3",
                       "--warmup", "0", "--json", "--no-progress", "--plot-dir", str(tmp_path)])
    assert code == 0
    ratio = {r["context"]: r["decode_ratio_to_shortest"] for r in json_line(out)["results"]}
    assert ratio == {8: 1.0, 12: 1.5}
    assert json_line(out)["settings"]["ratio_reference_context"] == 8
    assert "x N=8" in out


@pytest.mark.parametrize(("flags", "message"), [
    (["--contexts", "16,0"], "--contexts: every value must be >= 1"),
    (["--contexts", "1k"], "--contexts: expected comma-separated integers"),
    (["--contexts", "16,48,16"], "--contexts: each value once"),
    (["--decode-steps", "0"], "--decode-steps must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--archs", "rnn"], "--archs: unknown value 'rnn'"),
    (["--vocab", "0"], "--vocab must be >= 1"),
])
def test_bad_input_is_a_one_line_value_error(bench, tmp_path, flags, message):
    with pytest.raises(ValueError) as err:
        bench(["decode", "--quick", "--no-progress", "--plot-dir", str(tmp_path), *flags])
    assert message in str(err.value) and "\n" not in str(err.value)
