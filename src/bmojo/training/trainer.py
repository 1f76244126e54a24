"""One trainer for every task: AdamW with decay groups, warmup + cosine, gradient clipping,
bf16 autocast, gradient accumulation, the innovation auxiliary loss, early stop at a target
accuracy, JSON-lines metrics, atomic checkpoints and exact resume.

Data come from a function ``batches(step, micro_step) -> Batch`` that must be a pure
function of its arguments (e.g. seeded by them): that is what makes a resumed run see the
very batches the uninterrupted run would have seen.

Under torchrun (:mod:`bmojo.training.distributed`) ``batch_size`` stays the global batch of
one optimizer step: every process builds the same global batch from ``batches`` and trains
on its own contiguous rows of it, so N processes see disjoint data, compute the same steps as
one process with the same ``batch_size`` (up to floating-point summation order), and a run
resumes exactly on any number of processes. The loss of each process is its summed token
loss divided by the labelled tokens of the whole global micro-batch, times the number of
processes, so that the gradient average DDP and FSDP2 take equals the gradient of the global
mean loss even when processes hold different numbers of labelled tokens. Rank 0 alone logs,
shows the progress bar and writes files, except the sharded FSDP2 checkpoint, which every
process writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from bmojo.compilation import compile_static
from bmojo.data.synthetic import IGNORE_INDEX
from bmojo.device import require_kernels_run_on
from bmojo.models.lm import LanguageModel
from bmojo.serialization import from_dict_strict
from bmojo.training.checkpoint import (
    export_pretrained,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from bmojo.training.distributed import Distributed, wrap_model
from bmojo.training.precision import PRECISIONS, resolve_precision
from bmojo.training.schedule import lr_at

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[tuple[int, Any]]:
    """``(line number, JSON record)`` of each line of a ``metrics.jsonl``. A partial last line (a
    write in progress, or a kill in the middle of one) is skipped; a broken line elsewhere is a
    ValueError."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from err
    return records


@dataclass
class Batch:
    inputs: Tensor  # [B, L] token ids
    labels: Tensor  # [B, L] target ids, IGNORE_INDEX where there is nothing to predict


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    max_steps: int = 2000
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 32
    grad_accum: int = 1
    precision: str = "auto"  # bf16 autocast where it is fast, else fp32 (bmojo.training.precision)
    aux_loss_weight: float = 1.0
    eval_every: int = 200
    log_every: int = 10
    checkpoint_every: int = 200
    target_accuracy: float | None = None
    max_nonfinite: int = 5
    tensorboard: bool = False  # also log metrics to out_dir/tensorboard (needs the tensorboard package)
    compile: bool = False  # the training forward under torch.compile, static shapes (docs/performance.md)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("lr", self.lr > 0, "> 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"), ("max_steps", self.max_steps >= 1, ">= 1"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"), ("grad_clip", self.grad_clip > 0, "> 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"), ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("aux_loss_weight", self.aux_loss_weight >= 0, ">= 0"), ("eval_every", self.eval_every >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"), ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("max_nonfinite", self.max_nonfinite >= 1, ">= 1"),
            ("target_accuracy", self.target_accuracy is None or 0 < self.target_accuracy <= 1, "None or in (0, 1]"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict_strict(cls, data)


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    train_accuracy: float
    eval_metrics: dict[str, float]
    stopped_early: bool
    elapsed_s: float


def summed_loss_and_accuracy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy summed over labelled positions; returns ``(summed loss, correct, labelled)``."""
    mask = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    correct = ((logits.argmax(-1) == labels) & mask).sum()
    return loss, correct, mask.sum()


def loss_and_accuracy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy over labelled positions; returns ``(mean loss, correct, labelled)``."""
    loss, correct, labelled = summed_loss_and_accuracy(logits, labels)
    return loss / labelled, correct, labelled


def _param_names_by_group(model: LanguageModel, weight_decay: float) -> list[dict[str, Any]]:
    """The model's AdamW groups with parameter names in place of parameters (FSDP2 replaces
    the parameters, and drops the ``_no_weight_decay`` marks the groups are made from)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [{**group, "params": [names[id(p)] for p in group["params"]]}
            for group in model.optimizer_param_groups(weight_decay)]


class Trainer:
    """Trains ``model`` on ``batches``; writes ``out_dir/metrics.jsonl``,
    ``out_dir/checkpoint/`` (resumable) and, at the end, the model itself in ``out_dir``.

    ``distributed`` (from :func:`bmojo.training.distributed.init_distributed`) makes this
    process one of a data-parallel job: DDP, or FSDP2 when ``distributed.fsdp``; ``device``
    is then this process's device. ``self.model`` is the model itself (sharded in place under
    FSDP2), ``self.parallel_module`` the model in its data-parallel wrapper (DDP) or the model, and
    ``self.train_module`` what the training forward runs through: that, or it compiled (``compile``).
    """

    def __init__(
        self,
        model: LanguageModel,
        config: TrainConfig,
        batches: Callable[[int, int], Batch],
        out_dir: str | Path,
        evaluate: Callable[[LanguageModel], dict[str, float]] | None = None,
        device: str | torch.device | None = None,
        progress: bool = True,
        distributed: Distributed | None = None,
    ):
        self.dist = distributed or Distributed()
        if config.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size={config.batch_size} is the global batch of a step, split evenly between "
                             f"the processes: it must be a multiple of their number, {self.dist.world_size}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        require_kernels_run_on(model.config, self.device)
        self.model = model.to(self.device)
        self.config = config
        self.batches = batches
        self.evaluate = evaluate
        self.out_dir = Path(out_dir)
        self.progress = progress and self.dist.is_main
        # "auto" measures the CPU: every process takes rank 0's choice
        self.precision, self.precision_reason = self.dist.broadcast(resolve_precision(config.precision, self.device))
        groups = _param_names_by_group(self.model, config.weight_decay)
        if config.compile and self.dist.fsdp:
            raise ValueError("compile=True does not combine with FSDP2 (--fsdp) here; use DDP or one process")
        self.parallel_module = wrap_model(self.model, self.dist, self.device, self.precision)
        self.train_module = (compile_static(self.parallel_module, self.device, "compile=True") if config.compile
                             else self.parallel_module)
        params = dict(self.model.named_parameters())
        self.optimizer = torch.optim.AdamW([{**group, "params": [params[name] for name in group["params"]]}
                                            for group in groups], lr=config.lr, betas=(config.beta1, config.beta2))
        self.step = 0
        self.nonfinite_streak = 0
        self.elapsed_s = 0.0
        self.eval_metrics: dict[str, float] = {}
        self.tensorboard = None
        if config.tensorboard and self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard") from err
            self.tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"))

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def _truncate_metrics(self) -> None:
        """Drop records logged after the checkpoint being resumed (they will be redone), and the
        partial last line a kill in the middle of a write leaves."""
        path = self.out_dir / METRICS_FILE
        if self.dist.is_main and path.exists():
            kept = [record for _, record in read_metrics(path) if record.get("step", 0) <= self.step]
            path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "nonfinite_streak": self.nonfinite_streak, "elapsed_s": self.elapsed_s,
                "eval_metrics": self.eval_metrics, "train_config": asdict(self.config),
                "torch_rng": torch.get_rng_state().tolist()}

    def save(self) -> None:
        """Checkpoint: sharded by every process under FSDP2, else one file set by rank 0."""
        if self.dist.fsdp:
            save_sharded_checkpoint(self.checkpoint_path, self.model, self.optimizer, self._state(), self.dist)
        elif self.dist.is_main:
            save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self._state())

    def resume(self) -> None:
        """Continue from ``out_dir/checkpoint`` exactly where it stopped, whatever the number of
        processes that wrote it (every process reads it; rank 0's random state is restored)."""
        if find_checkpoint(self.checkpoint_path) is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out_dir} to resume from")
        state = load_checkpoint(self.checkpoint_path, self.model, self.optimizer)
        self.step = state["step"]
        self.nonfinite_streak = state["nonfinite_streak"]
        self.elapsed_s = state["elapsed_s"]
        self.eval_metrics = state["eval_metrics"]
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        self._truncate_metrics()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _gradient_sync(self, last_micro: bool):
        """DDP all-reduces gradients only on a step's last micro-batch (FSDP2 reduce-scatters
        every one, which keeps the accumulated gradients sharded)."""
        if isinstance(self.parallel_module, torch.nn.parallel.DistributedDataParallel) and not last_micro:
            return self.parallel_module.no_sync()
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step over ``grad_accum`` micro-batches. Returns its metrics (over the
        global batch), or ``None`` when the loss or gradients were not finite and the step was
        skipped. Every process runs every micro-batch, so all take part in the same collectives
        and reach the same decision."""
        cfg = self.config
        lr = lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_module.train()
        loss = aux_loss = correct = labelled = tokens = nonfinite = 0.0  # this process's sums over micro-batches
        for micro in range(cfg.grad_accum):
            batch = self.batches(self.step, micro)  # the global micro-batch, [B, L]
            labelled_in_batch = int((batch.labels != IGNORE_INDEX).sum())
            rows = self.dist.rows(batch.inputs.shape[0])
            inputs, labels = batch.inputs[rows].to(self.device), batch.labels[rows].to(self.device)  # [B / N, L]
            with self._gradient_sync(last_micro=micro == cfg.grad_accum - 1):
                with self._autocast():
                    out = self.train_module(inputs)
                loss_sum, n_correct, n_labelled = summed_loss_and_accuracy(out.logits, labels)
                share = loss_sum / labelled_in_batch  # this process's part of the global batch's mean loss
                # DDP and FSDP2 average the processes' gradients: scale by their number to sum the shares
                objective = (share * self.dist.world_size + cfg.aux_loss_weight * out.aux_loss) / cfg.grad_accum
                objective.backward()
            loss += share.item()
            aux_loss += out.aux_loss.item()
            correct += int(n_correct)
            labelled += int(n_labelled)
            tokens += inputs.numel()
            nonfinite += not torch.isfinite(objective)
        sums = torch.tensor([loss, aux_loss, correct, labelled, tokens, nonfinite], dtype=torch.float64,
                            device=self.device)
        loss, aux_loss, correct, labelled, tokens, nonfinite = self.dist.all_reduce_sum(sums).tolist()  # global
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.dist.fsdp:
            grad_norm = grad_norm.full_tensor()  # a DTensor, already reduced over the processes
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss / cfg.grad_accum, "aux_loss": aux_loss / (cfg.grad_accum * self.dist.world_size),
                "accuracy": correct / max(labelled, 1), "lr": lr, "grad_norm": float(grad_norm),
                "tokens": int(tokens)}

    def _run_eval(self) -> None:
        """Every process evaluates (under FSDP2 each forward needs them all); rank 0's metrics
        are kept everywhere, so every process takes the same early-stop decision."""
        if self.evaluate is None:
            return
        self.model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in self.evaluate(self.model).items()}
        self.eval_metrics = self.dist.broadcast(metrics)
        self._log({"step": self.step, **{f"eval_{k}": v for k, v in self.eval_metrics.items()}})

    def _target_reached(self) -> bool:
        target = self.config.target_accuracy
        return target is not None and self.eval_metrics.get("accuracy", 0.0) >= target

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        last: dict[str, float] = {"loss": math.nan, "accuracy": math.nan}
        stopped_early = resume and self._target_reached()  # it had stopped there: nothing left to do
        self._log({"step": self.step, "event": "precision", "precision": self.precision,
                   "reason": self.precision_reason})
        if self.progress:  # rank 0 only
            tqdm.write(f"precision {self.precision} ({self.precision_reason})")
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True)
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < cfg.max_steps and not stopped_early:
            started = time.perf_counter()
            metrics = self.train_step()
            self.elapsed_s += time.perf_counter() - started
            self.step += 1
            bar.update(1)
            if metrics is None:  # the step's batch is skipped; the weights are untouched
                self.nonfinite_streak += 1
                self._log({"step": self.step, "event": "nonfinite_loss_skipped", "streak": self.nonfinite_streak})
                if self.nonfinite_streak >= cfg.max_nonfinite:
                    bar.close()
                    raise TrainingDiverged(
                        f"{self.nonfinite_streak} non-finite losses in a row at step {self.step}; stopping. "
                        f"The last good checkpoint is {self.checkpoint_path} (lower the learning rate?)")
                continue
            self.nonfinite_streak = 0
            last = metrics
            window_tokens += metrics["tokens"]
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                window_tokens, window_start = 0, time.perf_counter()
                self._log({"step": self.step, **{k: v for k, v in metrics.items() if k != "tokens"},
                           "tokens_per_s": tokens_per_s, "elapsed_s": self.elapsed_s})
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                                tok_s=f"{tokens_per_s:,.0f}",
                                **{f"val_{k}": f"{v:.3f}" for k, v in self.eval_metrics.items()})
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                self._run_eval()
                if self._target_reached():
                    stopped_early = self.step < cfg.max_steps
                    break
            if self.step % cfg.checkpoint_every == 0:
                self.save()
        bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.save()
        export_pretrained(self.model, self.out_dir, self.dist)
        return TrainResult(self.step, last["loss"], last["accuracy"], self.eval_metrics, stopped_early,
                           self.elapsed_s)
