import json

import pytest
import torch

from bmojo import LanguageModel, ModelConfig
from bmojo.training import Batch, TrainConfig, Trainer
from bmojo.training import precision as precision_module
from bmojo.training.precision import resolve_precision


@pytest.fixture
def measured_speedup(monkeypatch):
    """Make the CPU probe report a chosen bf16/fp32 speed ratio instead of timing matmuls."""
    def set_speedup(ratio: float) -> None:
        seconds = {torch.float32: 1.0, torch.bfloat16: 1.0 / ratio}
        monkeypatch.setattr(precision_module, "_matmul_seconds", lambda: seconds)
        precision_module.cpu_bf16_speedup.cache_clear()

    yield set_speedup
    precision_module.cpu_bf16_speedup.cache_clear()


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_an_explicit_precision_is_kept(requested):
    assert resolve_precision(requested, "cpu") == (requested, "requested")


def test_an_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("ratio, expected", [(3.0, "bf16"), (0.25, "fp32")])
def test_auto_on_cpu_takes_bf16_only_where_it_measured_faster(measured_speedup, ratio, expected):
    measured_speedup(ratio)
    chosen, reason = resolve_precision("auto", "cpu")
    assert chosen == expected
    assert f"{ratio:.2f}x" in reason


def test_the_real_probe_returns_a_positive_ratio():
    precision_module.cpu_bf16_speedup.cache_clear()
    assert precision_module.cpu_bf16_speedup() > 0


@pytest.mark.parametrize("ratio, autocast", [(3.0, True), (0.25, False)])
def test_the_trainer_runs_and_logs_the_resolved_precision(tmp_path, measured_speedup, ratio, autocast):
    measured_speedup(ratio)
    model = LanguageModel(ModelConfig.preset("transformer", vocab_size=16, d_model=32, n_layers=1, n_heads=2,
                                             mlp_ratio=0))
    seen = []

    def batches(step, micro):
        seen.append(torch.is_autocast_enabled("cpu"))
        return Batch(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))

    trainer = Trainer(model, TrainConfig(max_steps=1, warmup_steps=0, batch_size=2), batches, tmp_path,
                      progress=False)
    original_forward = model.forward

    def recording_forward(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original_forward(*args, **kwargs)

    model.forward = recording_forward
    trainer.fit()
    assert seen[-1] is autocast  # inside the forward, autocast is on exactly when bf16 was chosen
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = next(e for e in events if e.get("event") == "precision")
    assert logged["precision"] == ("bf16" if autocast else "fp32")
    assert "measured" in logged["reason"]


def test_the_cpu_probe_times_both_dtypes_after_a_warm_up():
    seconds = precision_module._matmul_seconds(repeats=2, warmup_s=0.001)
    assert seconds.keys() == {torch.float32, torch.bfloat16}
    assert all(0 < s < 1 for s in seconds.values())
