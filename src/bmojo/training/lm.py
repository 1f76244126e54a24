"""A language-modelling run (`bmojo train --task lm --data DIR ...`): random windows of
``seq_len`` tokens from prepared token shards, the recall runs' trainer, validation
perplexity every ``eval_every`` steps, and the tokenizer saved with the checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bmojo.config import LM_SIZES, ModelConfig
from bmojo.data.shards import TokenShards
from bmojo.device import device_or_default, require_kernels_run_on
from bmojo.evaluation.perplexity import perplexity_at
from bmojo.models.lm import LanguageModel
from bmojo.models.sizing import matched_model, param_count
from bmojo.serialization import from_dict_strict
from bmojo.training.distributed import Distributed
from bmojo.training.trainer import Batch, TrainConfig, Trainer, TrainResult

RUN_FILE = "run.json"

@dataclass
class LMRun:
    """Everything a language-modelling run needs; ``model`` overrides the size's shapes."""

    data: str
    arch: str = "bmojo"
    size: str = "laptop"
    seq_len: int = 256
    eval_tokens: int = 32768  # validation tokens per evaluation
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: str = "lm"

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if self.size not in LM_SIZES:
            raise ValueError(f"size={self.size!r} is unknown: choose from {list(LM_SIZES)}")
        if self.seq_len < 1 or self.eval_tokens < 1:
            raise ValueError(f"seq_len and eval_tokens must be >= 1, got {self.seq_len}, {self.eval_tokens}")
        self.model_config()  # validate early

    def shards(self) -> TokenShards:
        return TokenShards(self.data)

    def model_config(self) -> ModelConfig:
        vocab = self.shards().vocab_size
        base = LM_SIZES[self.size]
        shapes = base
        if "d_model" not in self.model:  # the size's width, matched to B'MOJO's parameter count
            target = param_count(ModelConfig.preset("bmojo", **base, vocab_size=vocab))
            shapes = matched_model(self.arch, base, target, vocab)
        return ModelConfig.preset(self.arch, **{**shapes, **self.model, "vocab_size": vocab,
                                                "max_seq_len": self.seq_len})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMRun:
        return from_dict_strict(cls, data)


def validation_loss(model: LanguageModel, shards: TokenShards, seq_len: int, max_tokens: int,
                    precision: str = "fp32") -> dict[str, float]:
    """Mean loss and perplexity on the first ``max_tokens`` validation tokens, windows of ``seq_len``."""
    result = perplexity_at(model, shards.tokens("val"), seq_len, max_tokens=max_tokens, precision=precision)
    return {"loss": result.loss, "ppl": result.perplexity}


def train_lm(run: LMRun, out_dir: str | Path, resume: bool = False, device: str | None = None,
             progress: bool = True, distributed: Distributed | None = None) -> TrainResult:
    """Train ``run`` into ``out_dir`` (checkpoints, metrics, ``run.json``, the tokenizer and the
    final model, which is also loadable by ``bmojo eval --task lm`` and ``bmojo generate``).
    With ``distributed``, this process is one of a torchrun job (see :class:`Trainer`); rank 0
    writes the files."""
    distributed = distributed or Distributed()
    out_dir = Path(out_dir)
    require_kernels_run_on(run.model_config(), device_or_default(device))  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume and (out_dir / RUN_FILE).is_file():
        saved = json.loads((out_dir / RUN_FILE).read_text())
        if saved != run.to_dict():
            raise ValueError(f"--resume: the run in {out_dir} was started with different settings")
    distributed.barrier()  # every process has read run.json before rank 0 rewrites it
    shards = run.shards()
    if distributed.is_main:
        (out_dir / RUN_FILE).write_text(json.dumps(run.to_dict(), indent=2))
        shards.tokenizer.save(out_dir)
    device = device_or_default(device)
    torch.manual_seed(run.train.seed)
    model = LanguageModel(run.model_config())
    accum, batch_size = run.train.grad_accum, run.train.batch_size

    def batches(step: int, micro: int) -> Batch:  # the global batch; the trainer gives each process its rows
        window = shards.batch("train", step * accum + micro, batch_size, run.seq_len, seed=run.train.seed)
        return Batch(inputs=window[:, :-1], labels=window[:, 1:])  # [B, seq_len] each

    def validate(m: LanguageModel) -> dict[str, float]:  # in the precision the trainer resolved (same on every rank)
        return validation_loss(m, shards, run.seq_len, run.eval_tokens, trainer.precision)

    trainer = Trainer(model, run.train, batches, out_dir, evaluate=validate, device=device, progress=progress,
                      distributed=distributed)
    return trainer.fit(resume=resume)
