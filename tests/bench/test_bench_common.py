import pytest
import torch

from bmojo.bench.common import (
    Spread,
    format_bytes,
    matched_configs,
    paired_ratio,
    parse_choices,
    parse_int_list,
    resolve_device,
    run_interleaved,
    timed,
)
from bmojo.models.sizing import param_count


def test_run_interleaved_calls_each_runner_once_per_round_and_drops_the_warmup():
    calls = []

    def runner(name):
        def run():
            calls.append(name)
            return len(calls)  # the global call index
        return run

    ticks = []
    results = run_interleaved({"a": runner("a"), "b": runner("b")}, repeats=2, warmup=1,
                              on_run=lambda: ticks.append(1))
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert results == {"a": [3, 5], "b": [4, 6]}
    assert len(ticks) == 6


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # rounds: 1, 2, 3 s over 2, 2, 6 s -> ratios 0.5, 1, 0.5 (the ratio of the medians would be 2/2 = 1)
    assert paired_ratio([1.0, 2.0, 3.0], [2.0, 2.0, 6.0]) == 0.5


def test_timed_reads_the_clock_around_the_function():
    readings = iter([10.0, 12.5])
    calls = []
    assert timed(lambda: calls.append(1), torch.device("cpu"), clock=lambda: next(readings)) == 2.5
    assert calls == [1]


def test_spread_of_times_and_rates():
    times = Spread.of([2.0, 1.0, 4.0])
    assert (times.median, times.min, times.max, times.repeats) == (2.0, 1.0, 4.0, 3)
    rates = times.inverse(8.0)  # the slowest run is the lowest rate
    assert (rates.median, rates.min, rates.max) == (4.0, 2.0, 8.0)
    assert times.scaled(1e3).format(0) == "2000 [1000-4000]"
    with pytest.raises(ValueError):
        Spread.of([])


def test_parsers_and_formatting():
    assert parse_int_list("512,1024", "--lengths") == [512, 1024]
    assert parse_choices("fp32, bf16", "--precision", ["bf16", "fp32"]) == ["fp32", "bf16"]
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert resolve_device("cpu") == torch.device("cpu")


def test_matched_configs_keep_bmojo_shapes_and_match_the_others_parameters():
    shapes = {"d_model": 32, "n_layers": 2, "n_heads": 2, "window": 16, "chunk_size": 16, "eidetic_per_chunk": 2,
              "eidetic_capacity": 8, "d_state": 8, "ssm_headdim": 16}
    configs = matched_configs(["bmojo", "transformer"], shapes, vocab=50)
    assert configs["bmojo"].d_model == 32 and configs["bmojo"].vocab_size == 50
    target = param_count(configs["bmojo"])
    assert abs(param_count(configs["transformer"]) - target) < 0.2 * target
