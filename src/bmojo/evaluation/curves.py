"""Learning curves of training runs: one metric against the step, read from each run's
``metrics.jsonl`` (written by :class:`bmojo.training.Trainer`), as a table and a plot.

Small models learn recall abruptly and at run-dependent steps, so two runs are compared by
their curves, not by one final number (``../shared/MEASUREMENTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bmojo.training.trainer import METRICS_FILE, read_metrics


@dataclass
class Curve:
    """One run's values of ``metric`` by step, in step order."""

    label: str
    metric: str
    steps: list[int]
    values: list[float]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_curve(run_dir: str | Path, metric: str = "eval_accuracy", label: str | None = None) -> Curve:
    """The numeric ``metric`` records of ``run_dir/metrics.jsonl`` (label: the directory's name).
    Should a step be logged twice, its later record is the one kept."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the --out directory of a bmojo train run")
    by_step: dict[int, float] = {}
    numeric: set[str] = set()
    for number, record in read_metrics(path):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {number}: not a metrics record (a JSON object with an integer step)")
        numeric.update(k for k, v in record.items() if _is_number(v) and k != "step")
        if metric in record and _is_number(record[metric]):
            by_step[record["step"]] = float(record[metric])
    if not by_step:
        raise ValueError(f"{path} has no numeric {metric!r} records; its numeric metrics are {sorted(numeric)}")
    steps = sorted(by_step)
    return Curve(label or Path(run_dir).resolve().name, metric, steps, [by_step[s] for s in steps])


def format_curves(curves: list[Curve]) -> str:
    """A table with one row per step any run logged and one column per run (``-``: not logged)."""
    steps = sorted({s for curve in curves for s in curve.steps})
    width = max(8, *(len(curve.label) for curve in curves))
    lookup = [dict(zip(curve.steps, curve.values, strict=True)) for curve in curves]
    lines = [f"{'step':>7} " + " ".join(f"{curve.label:>{width}}" for curve in curves)]
    for step in steps:
        cells = [f"{values[step]:>{width}.4g}" if step in values else f"{'-':>{width}}" for values in lookup]
        lines.append(f"{step:>7} " + " ".join(cells))
    return "\n".join(lines)


def plot_curves(curves: list[Curve], path: str | Path, log_y: bool = False) -> Path:
    """One line per run, ``metric`` against the step, written to ``path`` (``.png`` added when it
    has no suffix); returns the path written."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for curve in curves:
        ax.plot(curve.steps, curve.values, marker="o", markersize=3, label=curve.label)
    metrics = sorted({curve.metric for curve in curves})
    ax.set_xlabel("step")
    ax.set_ylabel(", ".join(metrics))
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
