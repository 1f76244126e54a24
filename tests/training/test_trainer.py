import dataclasses
import json
import math

import pytest
import torch
from torch._dynamo.utils import counters

from bmojo import LanguageModel, ModelConfig
from bmojo.training import (
    IGNORE_INDEX,
    Batch,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    find_checkpoint,
    loss_and_accuracy,
    lr_at,
)
from bmojo.training.distributed import Distributed

MODEL = dict(vocab_size=16, d_model=32, n_layers=2, n_heads=2, window=4, chunk_size=4, eidetic_per_chunk=2,
             eidetic_capacity=4, d_state=8, ssm_headdim=16, mlp_ratio=0)


def tiny_model(seed=0, arch="bmojo"):
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig.preset(arch, **MODEL))


def copy_batches(step, micro):
    """Predict the token 3 positions back: a pure function of (step, micro)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randint(0, 16, (4, 24), generator=g)
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[:, 3:] = x[:, :-3]
    return Batch(x, labels)


def train_config(**overrides):
    # fp32: "auto" picks bf16 by timing a matmul, where bf16 is fast, and the tests compare runs
    base = dict(lr=3e-3, warmup_steps=2, max_steps=6, batch_size=4, eval_every=100, log_every=1,
                checkpoint_every=3, precision="fp32")
    return TrainConfig(**{**base, **overrides})


def test_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for s in range(115)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lrs[110] == pytest.approx(0.1) and lrs[114] == pytest.approx(0.1)


def test_loss_and_accuracy_ignore_unlabelled_positions():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]])
    labels = torch.tensor([[0, 0, IGNORE_INDEX]])
    loss, correct, labelled = loss_and_accuracy(logits, labels)
    expected = (torch.nn.functional.cross_entropy(logits[0, :2], labels[0, :2]))
    torch.testing.assert_close(loss, expected)
    assert (int(correct), int(labelled)) == (1, 2)


def test_optimizer_uses_decay_groups(tmp_path):
    trainer = Trainer(tiny_model(), train_config(weight_decay=0.1), copy_batches, tmp_path, progress=False)
    by_id = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        if name.endswith(("A_log", "dt_bias", ".D")) or p.dim() < 2:
            assert by_id[id(p)] == 0.0, name
        else:
            assert by_id[id(p)] == 0.1, name


def test_triton_kernels_off_cuda_fail_before_the_first_step(tmp_path, request):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.preset("mamba2", **MODEL, ssd_kernel="triton"))
    request.getfixturevalue("triton_without_interpreter")  # after the kernels' module is imported
    with pytest.raises(ValueError, match="ssd_kernel='triton': the Triton kernels run on CUDA"):
        Trainer(model, train_config(), copy_batches, tmp_path, device="cpu", progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


def test_training_learns_and_writes_outputs(tmp_path):
    trainer = Trainer(tiny_model(), train_config(max_steps=40, lr=1e-2, eval_every=20),
                      copy_batches, tmp_path, evaluate=lambda m: {"accuracy": 0.5}, progress=False)
    result = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    assert {"step", "loss", "aux_loss", "accuracy", "lr", "tokens_per_s", "grad_norm"} <= set(train[0])
    assert [r["step"] for r in records if "eval_accuracy" in r] == [20, 40]
    assert result.steps == 40 and not result.stopped_early
    loaded = LanguageModel.from_pretrained(tmp_path)  # the final model is a plain checkpoint
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 trainer.model.state_dict().values(), strict=True))
    assert find_checkpoint(tmp_path / "checkpoint") is not None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_equals_uninterrupted_training(tmp_path, precision):
    cfg = train_config(precision=precision, grad_accum=2)
    reference = Trainer(tiny_model(), cfg, copy_batches, tmp_path / "a", progress=False)
    reference.fit()

    def killed_at_step_4(step, micro):
        if step == 4:
            raise KeyboardInterrupt
        return copy_batches(step, micro)

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_model(), cfg, killed_at_step_4, tmp_path / "b", progress=False).fit()
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # and the kill came in the middle of a write
        f.write('{"step": 4, "lo')
    resumed = Trainer(tiny_model(seed=123), cfg, copy_batches, tmp_path / "b", progress=False)
    resumed.fit(resume=True)
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "event" not in r]
    assert steps == sorted(set(steps)) == list(range(1, 7))  # nothing lost, nothing logged twice
    assert [r["step"] for r in records if r.get("event") == "precision"] == [0, 3]  # each process says what ran


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_model(), train_config(), copy_batches, tmp_path, progress=False).fit(resume=True)


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path):
    model = tiny_model()
    forward = model.forward
    poisoned_steps = {2}

    def forward_with_nan(tokens, cache=None):
        out = forward(tokens, cache)
        if trainer.step in poisoned_steps:
            out.logits = out.logits * math.nan
        return out

    model.forward = forward_with_nan
    trainer = Trainer(model, train_config(max_steps=5, checkpoint_every=1), copy_batches, tmp_path, progress=False)
    trainer.fit()  # one bad step: skipped and logged, training goes on
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "nonfinite_loss_skipped"] == [3]  # the 3rd step
    assert trainer.step == 5

    poisoned_steps.update(range(100))
    trainer = Trainer(model, train_config(max_steps=5, checkpoint_every=1, max_nonfinite=3), copy_batches,
                      tmp_path / "diverged", progress=False)
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row"):
        trainer.fit()


def test_early_stop_at_target_accuracy(tmp_path):
    trainer = Trainer(tiny_model(), train_config(max_steps=50, eval_every=5, target_accuracy=0.9), copy_batches,
                      tmp_path, evaluate=lambda m: {"accuracy": 0.95}, progress=False)
    result = trainer.fit()
    assert result.stopped_early and result.steps == 5
    # resuming a run that stopped at its target does not train further
    resumed = Trainer(tiny_model(), train_config(max_steps=50, eval_every=5, target_accuracy=0.9), copy_batches,
                      tmp_path, evaluate=lambda m: {"accuracy": 0.95}, progress=False)
    result = resumed.fit(resume=True)
    assert result.stopped_early and result.steps == 5


def test_interrupted_checkpoint_swap_falls_back_to_the_old_copy(tmp_path):
    trainer = Trainer(tiny_model(), train_config(max_steps=3), copy_batches, tmp_path, progress=False)
    trainer.fit()
    ckpt = tmp_path / "checkpoint"
    ckpt.rename(tmp_path / ".checkpoint.old")  # killed between the two renames of a swap
    assert find_checkpoint(ckpt) == tmp_path / ".checkpoint.old"
    resumed = Trainer(tiny_model(seed=5), train_config(max_steps=4), copy_batches, tmp_path, progress=False)
    resumed.fit(resume=True)
    assert resumed.step == 4


@pytest.mark.parametrize("field, value", [("lr", 0.0), ("precision", "fp16"), ("grad_accum", 0),
                                          ("target_accuracy", 1.5), ("max_steps", 0)])
def test_invalid_train_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_progress_bar_shows_the_latest_validation_metrics(tmp_path, capsys):
    trainer = Trainer(tiny_model(), train_config(max_steps=4, eval_every=2, log_every=1), copy_batches, tmp_path,
                      evaluate=lambda m: {"ppl": 12.5}, progress=True)
    trainer.fit()
    assert "val_ppl=12.500" in capsys.readouterr().err


def test_tensorboard_logging(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            Trainer(tiny_model(), train_config(tensorboard=True), copy_batches, tmp_path, progress=False)
        return
    trainer = Trainer(tiny_model(), train_config(max_steps=2, log_every=1, tensorboard=True), copy_batches,
                      tmp_path, progress=False)
    trainer.fit()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.requires_cxx
def test_compile_trains_like_eager_and_checkpoints_the_model(tmp_path):
    torch.compiler.reset()
    counters.clear()
    config = train_config(max_steps=2, checkpoint_every=2)
    compiled = Trainer(tiny_model(), dataclasses.replace(config, compile=True), copy_batches, tmp_path / "compiled",
                       progress=False)
    assert compiled.train_module is not compiled.model
    result = compiled.fit()
    assert counters["stats"]["unique_graphs"] > 0  # the training forward ran compiled
    eager = Trainer(tiny_model(), config, copy_batches, tmp_path / "eager", progress=False)
    assert eager.fit().train_loss == pytest.approx(result.train_loss, rel=1e-4)
    resumed = Trainer(tiny_model(seed=1), config, copy_batches, tmp_path / "compiled", progress=False)
    resumed.resume()  # the checkpoint holds the model's own parameter names, loadable without compile
    for (name, c), (_, e), (_, r) in zip(compiled.model.named_parameters(), eager.model.named_parameters(),
                                         resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(r, c, atol=0, rtol=0, msg=name)


def test_compile_with_fsdp_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="compile=True does not combine with FSDP2"):
        Trainer(tiny_model(), train_config(compile=True), copy_batches, tmp_path, progress=False,
                distributed=Distributed(fsdp=True))
