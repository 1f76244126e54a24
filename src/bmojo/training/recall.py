"""A recall training run (`bmojo train --task mqar ...`): the task mixture, the model, the
trainer and the evaluation on longer test sequences, described by one JSON-able spec."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bmojo.config import ModelConfig
from bmojo.data.synthetic import DEFAULT_LENGTHS, make_dataset, make_mixture
from bmojo.device import device_or_default, require_kernels_run_on
from bmojo.evaluation.recall import RecallReport, evaluate_recall
from bmojo.models.lm import LanguageModel
from bmojo.serialization import from_dict_strict
from bmojo.training.distributed import Distributed
from bmojo.training.trainer import TrainConfig, Trainer, TrainResult

RUN_FILE = "run.json"


@dataclass
class RecallRun:
    """Everything a recall run needs. ``task_fields`` are the task config's fields (a list
    value makes a mixture, e.g. ``num_kv_pairs=[4, 8]``); ``model`` overrides the preset."""

    task: str = "mqar"
    arch: str = "bmojo"
    task_fields: dict[str, Any] = field(default_factory=dict)
    train_lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS["train"]))
    test_lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS["test"]))
    eval_examples: int = 512
    far_from: int | None = None  # queries at least this far back count as far; None: window + fading span
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        self.model_config()  # validate early, with the task's vocabulary
        self.train_mixture()
        self.test_mixture()

    @property
    def vocab_size(self) -> int:
        return self.train_mixture().configs[0].vocab_size

    def model_config(self) -> ModelConfig:
        return ModelConfig.preset(self.arch, **{**self.model, "vocab_size": self.vocab_size,
                                                "max_seq_len": max(self.test_lengths)})

    def train_mixture(self):
        return make_mixture(self.task, split="train", seed=self.train.seed, lengths=self.train_lengths,
                            **self.task_fields)

    def test_mixture(self):
        return make_mixture(self.task, split="test", seed=self.train.seed, lengths=self.test_lengths,
                            **self.task_fields)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecallRun:
        return from_dict_strict(cls, data)

    @classmethod
    def load(cls, out_dir: str | Path) -> RecallRun:
        path = Path(out_dir) / RUN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{out_dir} holds no {RUN_FILE}: not a recall training run")
        return cls.from_dict(json.loads(path.read_text()))


def far_threshold(run: RecallRun, config: ModelConfig) -> int | None:
    """Distance from which a query counts as far: ``run.far_from``, else window + fading span
    of a model with windowed layers (only memory that outlives the window answers those)."""
    if run.far_from is not None:
        return run.far_from
    kinds = set(config.layer_pattern)
    if not kinds & set("WFB"):
        return None
    return config.window + (config.fading_span if kinds & set("FB") else 0)


def evaluate_run(model: LanguageModel, run: RecallRun, batch_size: int = 64) -> RecallReport:
    test = make_dataset(run.task, num_examples=run.eval_examples, split="test", seed=run.train.seed,
                        lengths=run.test_lengths, **run.task_fields)
    return evaluate_recall(model, test, batch_size, far_from=far_threshold(run, model.config))


def train_recall(run: RecallRun, out_dir: str | Path, resume: bool = False, device: str | None = None,
                 progress: bool = True, distributed: Distributed | None = None) -> tuple[TrainResult, RecallReport]:
    """Train ``run`` into ``out_dir`` (checkpoints, metrics, ``run.json``), then evaluate it on
    the longer test lengths. With ``distributed``, this process is one of a torchrun job (see
    :class:`Trainer`): every process evaluates, rank 0 writes the files."""
    distributed = distributed or Distributed()
    out_dir = Path(out_dir)
    require_kernels_run_on(run.model_config(), device_or_default(device))  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume and (out_dir / RUN_FILE).is_file():
        saved = RecallRun.load(out_dir)
        if saved.to_dict() != run.to_dict():
            raise ValueError(f"--resume: the run in {out_dir} was started with different settings")
    distributed.barrier()  # every process has read run.json before rank 0 rewrites it
    if distributed.is_main:
        (out_dir / RUN_FILE).write_text(json.dumps(run.to_dict(), indent=2))
    device = device_or_default(device)
    torch.manual_seed(run.train.seed)
    model = LanguageModel(run.model_config())
    mixture = run.train_mixture()
    accum, batch_size = run.train.grad_accum, run.train.batch_size
    validation = make_dataset(run.task, num_examples=min(run.eval_examples, 256), split="test",
                              seed=run.train.seed + 1, lengths=run.train_lengths, **run.task_fields)

    def batches(step: int, micro: int):  # the global batch; the trainer gives each process its rows
        return mixture.batch(step * accum + micro, batch_size)

    def validate(m: LanguageModel) -> dict[str, float]:
        return {"accuracy": evaluate_recall(m, validation, batch_size).accuracy}

    trainer = Trainer(model, run.train, batches, out_dir, evaluate=validate, device=device, progress=progress,
                      distributed=distributed)
    result = trainer.fit(resume=resume)
    report = distributed.broadcast(evaluate_run(trainer.model, run, batch_size))  # rank 0's, everywhere
    if distributed.is_main:
        (out_dir / "eval.json").write_text(json.dumps(dataclasses.asdict(report), indent=2))
    return result, report
