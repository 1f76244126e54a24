"""`bmojo demo`: the transductive-recall comparison, the project's main job.

Trains the six architectures of DESIGN.md §6 at close-to-equal parameter counts on a far
recall task (every query lies further back than window + fading span), evaluates them on
longer test sequences, and writes ``report.md``, ``recall_vs_state.png``, ``results.json``
and a checkpoint per architecture.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bmojo.config import PRESETS, ModelConfig
from bmojo.models.lm import LanguageModel
from bmojo.training.recall import RecallRun, train_recall
from bmojo.training.trainer import TrainConfig

ARCHS = tuple(PRESETS)


@dataclass
class DemoSettings:
    """The demo's task, model sizes and budget. ``learning_rates`` are per architecture
    (from the sweep recorded in docs/results.md)."""

    task: str = "far_recall"
    task_fields: dict[str, Any] = field(default_factory=lambda: {
        "vocab_size": 128, "num_kv_pairs": 6, "gap_min": 12, "power_a": 1.0})
    train_lengths: list[int] = field(default_factory=lambda: [64])
    test_lengths: list[int] = field(default_factory=lambda: [128])
    eval_examples: int = 512
    base_model: dict[str, Any] = field(default_factory=lambda: {
        "d_model": 64, "n_layers": 2, "n_heads": 2, "window": 4, "fading_span": 4, "chunk_size": 4,
        "eidetic_per_chunk": 4, "eidetic_capacity": 16, "d_state": 4, "ssm_headdim": 32, "expand": 2,
        "mlp_ratio": 0.0, "tie_embeddings": False})  # tied embeddings stalled recall learning (docs/results.md)
    match_params_of: str = "bmojo"
    max_steps: int = 1500
    batch_size: int = 32
    precision: str = "fp32"  # at this size bf16 casts cost more than they save on CPU
    learning_rates: dict[str, float] = field(default_factory=lambda: {
        "transformer": 3e-3, "swa": 3e-3, "mamba2": 3e-3, "hybrid": 3e-3, "bmojo-f": 3e-3, "bmojo": 3e-3})

    @classmethod
    def quick(cls) -> DemoSettings:
        """A run of about a minute for tests: tiny models, few steps, same pipeline."""
        return cls(task_fields={"vocab_size": 64, "num_kv_pairs": 4, "gap_min": 12, "power_a": 1.0},
                   train_lengths=[40], test_lengths=[64], eval_examples=64,
                   base_model={"d_model": 32, "n_layers": 2, "n_heads": 2, "window": 4, "fading_span": 4,
                               "chunk_size": 4, "eidetic_per_chunk": 2, "eidetic_capacity": 8, "d_state": 8,
                               "ssm_headdim": 16, "expand": 2, "mlp_ratio": 0.0},
                   max_steps=30, batch_size=16)


def _param_count(config: ModelConfig) -> int:
    with torch.device("meta"):
        return LanguageModel(config).num_params()


def matched_model(arch: str, base: dict[str, Any], target_params: int, vocab_size: int) -> dict[str, Any]:
    """``base`` with the width of ``arch`` chosen so its parameter count is closest to
    ``target_params`` (widths that keep heads and SSM heads whole)."""
    best, best_gap = base, None
    step = base["n_heads"] * 2
    for d_model in range(step, 4 * base["d_model"] + 1, step):
        candidate = {**base, "d_model": d_model}
        try:
            config = ModelConfig.preset(arch, **candidate, vocab_size=vocab_size)
        except ValueError:
            continue
        gap = abs(_param_count(config) - target_params)
        if best_gap is None or gap < best_gap:
            best, best_gap = candidate, gap
    return best


def run_demo(out_dir: str | Path, settings: DemoSettings, device: str | None = None,
             progress: bool = True, archs: tuple[str, ...] = ARCHS) -> list[dict[str, Any]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = settings.task_fields["vocab_size"]
    target = _param_count(ModelConfig.preset(settings.match_params_of, **settings.base_model, vocab_size=vocab))
    far_from = settings.base_model["window"] + settings.base_model["fading_span"]
    rows = []
    for arch in archs:
        model = matched_model(arch, settings.base_model, target, vocab)
        train = TrainConfig(lr=settings.learning_rates[arch], max_steps=settings.max_steps,
                            batch_size=settings.batch_size, precision=settings.precision,
                            warmup_steps=min(100, settings.max_steps // 10), eval_every=max(settings.max_steps // 4, 1),
                            checkpoint_every=max(settings.max_steps // 4, 1), log_every=10)
        run = RecallRun(task=settings.task, arch=arch, task_fields=settings.task_fields,
                        train_lengths=settings.train_lengths, test_lengths=settings.test_lengths,
                        eval_examples=settings.eval_examples, far_from=far_from, model=model, train=train)
        started = time.perf_counter()
        result, report = train_recall(run, out_dir / arch, device=device, progress=progress)
        config = run.model_config()
        rows.append({
            "arch": arch, "layers": config.layer_pattern, "d_model": config.d_model,
            "params": LanguageModel.from_pretrained(out_dir / arch).num_params(),
            "state_bytes": LanguageModel(config).state_size_bytes(),
            "accuracy": report.accuracy, "far_accuracy": report.far_accuracy, "far_from": far_from,
            "by_distance": report.by_distance, "steps": result.steps, "lr": train.lr,
            "train_time_s": time.perf_counter() - started,
        })
    write_outputs(out_dir, settings, rows)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = "| arch | layers | d_model | params | state (bytes/seq) | accuracy | far accuracy | train time |"
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        far = "n/a" if r["far_accuracy"] is None else f"{r['far_accuracy']:.3f}"
        lines.append(f"| {r['arch']} | {r['layers']} | {r['d_model']} | {r['params']:,} | {r['state_bytes']:,} | "
                     f"{r['accuracy']:.3f} | {far} | {r['train_time_s']:.0f} s |")
    return "\n".join(lines)


def plot_recall_vs_state(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["state_bytes"], r["accuracy"], s=50)
        ax.annotate(r["arch"], (r["state_bytes"], r["accuracy"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("decoder state per sequence (bytes, log scale)")
    ax.set_ylabel("recall accuracy (test lengths)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("Recall vs state size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, settings: DemoSettings, rows: list[dict[str, Any]]) -> None:
    (out_dir / "results.json").write_text(json.dumps({"settings": dataclasses.asdict(settings), "rows": rows},
                                                     indent=2))
    plot_recall_vs_state(rows, out_dir / "recall_vs_state.png")
    fields = ", ".join(f"{k}={v}" for k, v in settings.task_fields.items())
    report = [
        "# bmojo demo: transductive recall",
        "",
        f"Task `{settings.task}` ({fields}); trained on lengths {settings.train_lengths}, "
        f"tested on {settings.test_lengths} ({settings.eval_examples} examples). "
        f"{settings.max_steps} steps of batch {settings.batch_size}; widths matched to the parameter count "
        f"of `{settings.match_params_of}`. Far accuracy: queries further back than window + fading span.",
        "",
        format_table(rows),
        "",
        "![recall vs state](recall_vs_state.png)",
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(report))
