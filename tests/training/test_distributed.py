"""Data-parallel training on CPU with gloo: 2 processes started by torchrun (this file is also
their script, see ``_worker``) against one process with the same global batch."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bmojo
from bmojo import LanguageModel, ModelConfig
from bmojo.training import IGNORE_INDEX, Batch, TrainConfig, Trainer
from bmojo.training.checkpoint import is_sharded_checkpoint
from bmojo.training.distributed import Distributed, run_distributed

MODEL = dict(vocab_size=16, d_model=32, n_layers=2, n_heads=2, window=4, chunk_size=4, eidetic_per_chunk=2,
             eidetic_capacity=4, d_state=8, ssm_headdim=16, mlp_ratio=0)
TIMEOUT_S = 240  # a hung job fails the test instead of blocking the suite
SRC = Path(bmojo.__file__).resolve().parents[1]


def tiny_model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig.preset("bmojo", **MODEL))


def copy_batches(step: int, micro: int) -> Batch:
    """Global batch of 4 rows; predict the token 3 positions back. Row 0 labels half as many
    positions as the others, so the two processes hold different numbers of labelled tokens."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randint(0, 16, (4, 24), generator=g)
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[:, 3:] = x[:, :-3]
    labels[0, :13] = IGNORE_INDEX
    return Batch(x, labels)


def train_config(**overrides) -> TrainConfig:
    base = dict(lr=3e-3, warmup_steps=2, max_steps=6, batch_size=4, grad_accum=2, precision="fp32", eval_every=3,
                log_every=1, checkpoint_every=3)
    return TrainConfig(**{**base, **overrides})


def validation_loss(model: LanguageModel) -> dict[str, float]:
    """A fixed batch through the model (every process runs it: FSDP2's forward is collective)."""
    batch = copy_batches(10_000, 0)
    logits = model(batch.inputs).logits
    return {"loss": float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                                                            ignore_index=IGNORE_INDEX))}


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The whole parameters this process holds (gathered from the shards under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))


def _worker() -> None:
    """One torchrun process: train (or resume) into OUT, save this rank's whole parameters."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=None, help="this rank raises at step --fail-step")
    parser.add_argument("--fail-step", type=int, default=4)
    args = parser.parse_args()

    def job(distributed: Distributed, device: torch.device) -> int:
        def batches(step, micro):
            if distributed.rank == args.fail_rank and step == args.fail_step:
                raise RuntimeError(f"injected failure on rank {distributed.rank} at step {step}")
            return copy_batches(step, micro)

        trainer = Trainer(tiny_model(), train_config(), batches, args.out, evaluate=validation_loss, device=device,
                          progress=False, distributed=distributed)
        trainer.fit(resume=args.resume)
        torch.save(full_state(trainer), Path(args.out) / f"params_rank{distributed.rank}.pt")
        return 0

    run_distributed(job, device="cpu", fsdp=args.fsdp)


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", __file__, *args],
                          capture_output=True, text=True, env=env, timeout=TIMEOUT_S)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    steps = [r for r in records(out) if "loss" in r]
    assert len(steps) == len({r["step"] for r in steps}), "a step was logged twice (only rank 0 logs)"
    return {r["step"]: r["loss"] for r in steps}


def assert_same_params(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, msg=name)  # fp32 tolerance: summation order differs


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """One process, the same global batch: the run that the distributed ones must reproduce."""
    out = tmp_path_factory.mktemp("one_process")
    trainer = Trainer(tiny_model(), train_config(), copy_batches, out, evaluate=validation_loss, progress=False)
    trainer.fit()
    return out, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def check_job(out: Path, reference: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Both ranks end with the same parameters, those of one process; the logs match too."""
    rank0, rank1 = (torch.load(out / f"params_rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    ref_out, ref_params = reference
    assert_same_params(rank0, ref_params)
    assert_same_params(LanguageModel.from_pretrained(out).state_dict(), ref_params)  # the exported model
    expected = train_losses(ref_out)
    assert sorted(train_losses(out)) == sorted(expected) == list(range(1, 7))
    torch.testing.assert_close(train_losses(out), expected)
    evals = {r["step"]: r["eval_loss"] for r in records(out) if "eval_loss" in r}
    torch.testing.assert_close(evals, {r["step"]: r["eval_loss"] for r in records(ref_out) if "eval_loss" in r})


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, reference, mode):
    result = torchrun(str(tmp_path), *(["--fsdp"] if mode == "fsdp" else []))
    assert result.returncode == 0, result.stderr
    check_job(tmp_path, reference)
    assert is_sharded_checkpoint(tmp_path / "checkpoint") == (mode == "fsdp")


def test_failing_rank_stops_the_job_and_a_sharded_checkpoint_resumes_on_1_and_2_processes(tmp_path, reference):
    crashed = tmp_path / "crashed"
    started = time.perf_counter()
    result = torchrun(str(crashed), "--fsdp", "--fail-rank", "1", "--fail-step", "4")
    assert result.returncode != 0
    assert "rank 1 failed" in result.stderr and "injected failure on rank 1 at step 4" in result.stderr
    root_cause = result.stderr.split("Root Cause")[1]  # torchrun's summary names the rank that failed first
    assert re.search(r"rank\s*:\s*1 ", root_cause) and "injected failure on rank 1" in root_cause
    assert time.perf_counter() - started < TIMEOUT_S / 2  # rank 0, left waiting in a collective, was stopped
    checkpoint = crashed / "checkpoint"
    assert is_sharded_checkpoint(checkpoint)
    assert {p.name for p in checkpoint.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 3

    one = tmp_path / "resumed_on_1"
    shutil.copytree(crashed, one)
    trainer = Trainer(tiny_model(), train_config(), copy_batches, one, evaluate=validation_loss, progress=False)
    trainer.fit(resume=True)  # a single process without a process group reads the sharded checkpoint
    assert_same_params(trainer.model.state_dict(), reference[1])
    torch.testing.assert_close(train_losses(one), train_losses(reference[0]))

    two = tmp_path / "resumed_on_2"
    shutil.copytree(crashed, two)
    result = torchrun(str(two), "--fsdp", "--resume")
    assert result.returncode == 0, result.stderr
    check_job(two, reference)


def test_single_file_checkpoint_resumes_under_fsdp(tmp_path, reference):
    def killed_at_step_4(step, micro):
        if step == 4:
            raise KeyboardInterrupt
        return copy_batches(step, micro)

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_model(), train_config(), killed_at_step_4, tmp_path, evaluate=validation_loss,
                progress=False).fit()
    assert not is_sharded_checkpoint(tmp_path / "checkpoint")
    result = torchrun(str(tmp_path), "--fsdp", "--resume")
    assert result.returncode == 0, result.stderr
    check_job(tmp_path, reference)


def test_global_batch_is_split_evenly():
    assert [Distributed(rank=r, world_size=4).rows(8) for r in range(4)] == [slice(0, 2), slice(2, 4),
                                                                          slice(4, 6), slice(6, 8)]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        Distributed(rank=0, world_size=3).rows(8)
    with pytest.raises(ValueError, match="batch_size=4 is the global batch.*multiple of their number, 3"):
        Trainer(tiny_model(), train_config(), copy_batches, "unused", distributed=Distributed(world_size=3))


if __name__ == "__main__":
    _worker()
