"""`bmojo demo`: the transductive-recall comparison, the project's main job.

Trains the six architectures of DESIGN.md §6 at close-to-equal parameter counts on a far
recall task (every query lies further back than window + fading span), evaluates them on
longer test sequences, and writes ``report.md``, ``recall_vs_state.png``, ``results.json``
and a checkpoint per architecture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bmojo.config import PRESETS, ModelConfig
from bmojo.device import device_or_default
from bmojo.models.lm import LanguageModel
from bmojo.models.sizing import matched_model, param_count
from bmojo.training.checkpoint import find_checkpoint
from bmojo.training.recall import RUN_FILE, RecallRun, evaluate_run, train_recall
from bmojo.training.trainer import CHECKPOINT_DIR, METRICS_FILE, TrainConfig, read_metrics

ARCHS = tuple(PRESETS)
TRAINING_VARIATIONS = ("lr", "seed")  # --vary names that are not model fields
ROW_FILE = "demo_row.json"  # a finished run's table row, so that a re-run of the demo reuses it


@dataclass
class DemoSettings:
    """The demo's task, model sizes and budget. ``learning_rates`` are per architecture
    (from the sweep recorded in docs/results.md)."""

    task: str = "far_recall"
    task_fields: dict[str, Any] = field(default_factory=lambda: {
        "vocab_size": 128, "num_kv_pairs": 4, "gap_min": 24, "power_a": 1.0})
    train_lengths: list[int] = field(default_factory=lambda: [64])
    test_lengths: list[int] = field(default_factory=lambda: [128])
    eval_examples: int = 512
    # A second test of every trained model: every query at least ``long_gap`` positions after its
    # key (10 x (window + fading span + eidetic capacity), past any training distance), on
    # sequences of ``long_gap_length``. None: no second test.
    long_gap: int | None = 240
    long_gap_length: int = 304
    base_model: dict[str, Any] = field(default_factory=lambda: {
        "d_model": 64, "n_layers": 2, "n_heads": 2, "window": 4, "fading_span": 4, "chunk_size": 4,
        "eidetic_per_chunk": 4, "eidetic_capacity": 16, "d_state": 4, "ssm_headdim": 32, "expand": 2,
        "mlp_ratio": 0.0,
        "tie_embeddings": False,  # tied embeddings stalled recall learning (docs/results.md)
        "qkv_conv": 4})  # B'MOJO(-F)'s q, k, v convolution, which its read-out needs (docs/results.md)
    match_params_of: str = "bmojo"
    max_steps: int = 1000
    batch_size: int = 64
    eval_every: int = 100
    target_accuracy: float | None = 0.95  # stop a run early once validation accuracy reaches this
    precision: str = "fp32"  # at this size bf16 casts cost more than they save on CPU
    # CPU threads per run. The result of a run depends on its order of floating-point sums,
    # which depends on the thread count; fixing it makes the table the same whatever the
    # machine's core count and however many runs train side by side (--jobs).
    threads_per_run: int = 1
    learning_rates: dict[str, float] = field(default_factory=lambda: {
        "transformer": 1e-2, "swa": 1e-3, "mamba2": 1e-2, "hybrid": 1e-2, "bmojo-f": 1e-2, "bmojo": 1e-3})

    @classmethod
    def quick(cls) -> DemoSettings:
        """A run of about a minute for tests: tiny models, few steps, same pipeline."""
        return cls(task_fields={"vocab_size": 64, "num_kv_pairs": 4, "gap_min": 12, "power_a": 1.0},
                   train_lengths=[40], test_lengths=[64], eval_examples=64, long_gap=160, long_gap_length=200,
                   base_model={"d_model": 32, "n_layers": 2, "n_heads": 2, "window": 4, "fading_span": 4,
                               "chunk_size": 4, "eidetic_per_chunk": 2, "eidetic_capacity": 8, "d_state": 8,
                               "ssm_headdim": 16, "expand": 2, "mlp_ratio": 0.0, "qkv_conv": 4},
                   max_steps=30, batch_size=16)


@dataclass
class Variation:
    """One setting varied across runs: ``"lr"``, ``"seed"`` (of the weights and the data; the
    report gives each arch's median) or a :class:`ModelConfig` field (e.g.
    ``eidetic_capacity``), with the values to try. Widths stay matched on the base model."""

    name: str
    values: list[Any]

    def __post_init__(self) -> None:
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"arch", "vocab_size", "max_seq_len"}
        allowed = set(TRAINING_VARIATIONS) | model_fields
        if self.name not in allowed:
            raise ValueError(f"cannot vary {self.name!r}: vary lr, seed or a model field "
                             f"({', '.join(sorted(allowed))})")
        if not self.values:
            raise ValueError(f"--vary {self.name}: give at least one value")

    def label(self, value: Any) -> str:
        return f"{self.name}-{value:g}" if isinstance(value, float) else f"{self.name}-{value}"


def default_jobs(device: str | None, runs: int) -> int:
    """Runs trained side by side: one per CPU core this process may use (at most ``runs``);
    one on a GPU, which a single run already fills."""
    on_gpu = device_or_default(device).startswith("cuda")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if on_gpu else max(1, min(cores, runs))


def run_demo(out_dir: str | Path, settings: DemoSettings, device: str | None = None, progress: bool = True,
             archs: tuple[str, ...] = ARCHS, vary: Variation | None = None,
             jobs: int | None = None) -> list[dict[str, Any]]:
    """Train and evaluate every arch of ``archs`` (each value of ``vary``, if given) into
    ``out_dir/<arch>/`` (``out_dir/<arch>/<name>-<value>/`` with ``vary``); write the report.
    ``jobs`` runs train side by side in worker processes (default: :func:`default_jobs`),
    each on ``settings.threads_per_run`` threads, so the results do not depend on ``jobs``.
    Running it again on the same ``out_dir`` reuses finished runs and resumes interrupted ones."""
    unknown = [a for a in archs if a not in PRESETS]
    if unknown:
        raise ValueError(f"unknown architecture(s) {unknown}: choose from {list(PRESETS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = settings.task_fields["vocab_size"]
    target = param_count(ModelConfig.preset(settings.match_params_of, **settings.base_model, vocab_size=vocab))
    far_from = settings.base_model["window"] + settings.base_model["fading_span"]
    plan = []  # every run is built (and so validated) before the first one trains
    for arch in archs:
        matched = matched_model(arch, settings.base_model, target, vocab)
        for value in (vary.values if vary else [None]):
            model, lr, seed = dict(matched), settings.learning_rates[arch], TrainConfig.seed
            if vary and vary.name == "lr":
                lr = value
            elif vary and vary.name == "seed":
                seed = value
            elif vary:
                model[vary.name] = value
            run_dir = out_dir / arch / vary.label(value) if vary else out_dir / arch
            run = _recall_run(arch, model, lr, settings, far_from, seed)
            plan.append((run, run_dir, value, _long_gap_run(run, settings)))
    jobs = jobs or default_jobs(device, len(plan))
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    runs = [(run, run_dir) for run, run_dir, _, _ in plan]
    if jobs == 1:
        rows = _train_in_process(runs, device, progress, settings.threads_per_run)
    else:
        rows = _train_side_by_side(runs, device, progress, settings.threads_per_run, jobs)
    _add_long_gap_accuracy(rows, [(long_gap_run, run_dir) for _, run_dir, _, long_gap_run in plan], settings,
                           device, progress)
    if vary:
        for row, (_, _, value, _) in zip(rows, plan, strict=True):
            row["varied"] = {"name": vary.name, "value": value}
    write_outputs(out_dir, settings, rows, vary)
    return rows


def _long_gap_run(run: RecallRun, settings: DemoSettings) -> RecallRun | None:
    """``run``'s test with every query at least ``settings.long_gap`` positions after its key
    (built with the plan, so a task without ``gap_min`` fails before any training)."""
    if settings.long_gap is None:
        return None
    length = [settings.long_gap_length]
    try:
        return dataclasses.replace(run, task_fields={**run.task_fields, "gap_min": settings.long_gap},
                                   train_lengths=length, test_lengths=length)
    except ValueError as err:
        raise ValueError(f"DemoSettings.long_gap={settings.long_gap} with long_gap_length={settings.long_gap_length} "
                         f"does not make a test of task {run.task!r} ({err}); set long_gap=None to skip "
                         f"the second test") from err


def _add_long_gap_accuracy(rows: list[dict[str, Any]], long_gap_runs: list[tuple[RecallRun | None, Path]],
                           settings: DemoSettings, device: str | None, progress: bool) -> None:
    """Each trained model's accuracy on its long-gap test, added to its row (and row file),
    unless the row already has it for these settings (a reused run); without the test, a
    reused row's earlier result is left out of the table."""
    todo = []
    for row, (run, run_dir) in zip(rows, long_gap_runs, strict=True):
        if run is None:
            for key in ("long_gap", "long_gap_length", "long_gap_accuracy"):
                row.pop(key, None)
        elif (row.get("long_gap"), row.get("long_gap_length")) != (settings.long_gap, settings.long_gap_length):
            todo.append((row, run, run_dir))
    if not todo:
        return
    device = device_or_default(device)
    with _threads(settings.threads_per_run):  # as in training: the same numbers whatever the machine
        for row, run, run_dir in tqdm(todo, desc=f"test with gaps >= {settings.long_gap}", disable=not progress):
            model = LanguageModel.from_pretrained(run_dir).to(device)
            row.update(long_gap=settings.long_gap, long_gap_length=settings.long_gap_length,
                       long_gap_accuracy=evaluate_run(model, run).accuracy)
            (run_dir / ROW_FILE).write_text(json.dumps(row, indent=2))


@contextlib.contextmanager
def _threads(threads: int):
    """This process's torch threads set to ``threads`` for the block, then restored."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _train_in_process(runs: list[tuple[RecallRun, Path]], device: str | None, progress: bool,
                      threads: int) -> list[dict[str, Any]]:
    """One run after another in this process, each with its own progress bar."""
    with _threads(threads):
        return [_train_one(run, run_dir, device, progress) for run, run_dir in runs]


def _expected_cost(run: RecallRun) -> int:
    """Relative cost of a run's layers, to start the slowest runs first (the lanes then end
    together). Measured per demo step on one thread: a B'MOJO layer costs about three
    attention layers, a Mamba-2 layer two."""
    return run.train.max_steps * sum({"B": 3, "F": 3, "S": 2}.get(kind, 1)
                                     for kind in run.model_config().layer_kinds)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _train_in_worker(run: RecallRun, run_dir: Path, device: str | None) -> dict[str, Any]:
    return _train_one(run, run_dir, device, progress=False)


def _steps_done(run_dir: Path) -> int:
    """The last training step a run logged (0 before its first log line)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return 0
    return max([0] + [record["step"] for _, record in read_metrics(path) if "loss" in record])


def _train_side_by_side(runs: list[tuple[RecallRun, Path]], device: str | None, progress: bool, threads: int,
                        jobs: int) -> list[dict[str, Any]]:
    """Train ``runs`` in ``jobs`` worker processes, slowest first; one progress bar over all
    their steps (read from each run's metrics). A failing run stops them all with its error."""
    order = sorted(range(len(runs)), key=lambda i: -_expected_cost(runs[i][0]))
    total = sum(run.train.max_steps for run, _ in runs)
    bar = tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True,
               desc=f"{len(runs)} runs, {jobs} at a time")
    pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init, initargs=(threads,))
    try:
        pending = {i: pool.apply_async(_train_in_worker, (*runs[i], device)) for i in order}
        rows: dict[int, dict[str, Any]] = {}
        while len(rows) < len(runs):
            for i, result in list(pending.items()):
                if result.ready():
                    rows[i] = result.get()  # re-raises a worker's exception here
                    del pending[i]
                    bar.write(f"{runs[i][0].arch:12s} accuracy {rows[i]['accuracy']:.3f}  "
                              f"({rows[i]['steps']} steps, {rows[i]['train_time_s']:.0f} s)")
            done = sum(runs[i][0].train.max_steps if i in rows else _steps_done(runs[i][1]) for i in range(len(runs)))
            bar.update(done - bar.n)
            time.sleep(0.5)
        pool.close()  # every run is done: let the workers exit on their own, their resources released
        pool.join()
        return [rows[i] for i in range(len(runs))]
    finally:
        pool.terminate()  # a failed run (or Ctrl-C) stops the others; a no-op once the workers have exited
        pool.join()
        bar.close()


def _recall_run(arch: str, model: dict[str, Any], lr: float, settings: DemoSettings, far_from: int,
                seed: int = TrainConfig.seed) -> RecallRun:
    train = TrainConfig(lr=lr, seed=seed, max_steps=settings.max_steps, batch_size=settings.batch_size,
                        precision=settings.precision, warmup_steps=min(100, settings.max_steps // 10),
                        eval_every=settings.eval_every, target_accuracy=settings.target_accuracy,
                        checkpoint_every=settings.eval_every, log_every=10)
    return RecallRun(task=settings.task, arch=arch, task_fields=settings.task_fields,
                     train_lengths=settings.train_lengths, test_lengths=settings.test_lengths,
                     eval_examples=settings.eval_examples, far_from=far_from, model=model, train=train)


def _train_one(run: RecallRun, run_dir: Path, device: str | None, progress: bool) -> dict[str, Any]:
    """Train and evaluate ``run`` in ``run_dir``, or pick up what an earlier demo left there:
    a finished run is reused as it is, an interrupted one resumes from its checkpoint."""
    row_file = run_dir / ROW_FILE
    started_before = (run_dir / RUN_FILE).is_file()
    if started_before and RecallRun.load(run_dir).to_dict() != run.to_dict():
        raise ValueError(f"{run_dir} holds a run with other settings: choose another --out")
    if started_before and row_file.is_file():
        return json.loads(row_file.read_text())
    resume = started_before and find_checkpoint(run_dir / CHECKPOINT_DIR) is not None
    result, report = train_recall(run, run_dir, resume=resume, device=device, progress=progress)
    config = run.model_config()
    row = {
        "arch": run.arch, "layers": config.layer_pattern, "d_model": config.d_model,
        "params": LanguageModel.from_pretrained(run_dir).num_params(),
        "state_bytes": LanguageModel(config).state_size_bytes(),
        "accuracy": report.accuracy, "far_accuracy": report.far_accuracy, "far_from": run.far_from,
        "by_distance": report.by_distance, "steps": result.steps, "lr": run.train.lr,
        "train_time_s": result.elapsed_s, "dir": str(run_dir),
    }
    row_file.write_text(json.dumps(row, indent=2))
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per run; the varied setting, when there is one, comes second."""
    varied = rows[0].get("varied", {}).get("name") if rows else None
    long_gap = rows[0].get("long_gap") if rows else None
    columns = ["layers", "d_model", "params", "state (bytes/seq)", "lr", "steps", "accuracy", "far accuracy",
               *([f"gaps >= {long_gap}"] if long_gap is not None else []), "train time"]
    if varied == "lr":
        columns.remove("lr")
    header = ["arch"] + ([varied] if varied else []) + columns
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i <= len(header) - len(columns) else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        far = "n/a" if r["far_accuracy"] is None else f"{r['far_accuracy']:.3f}"
        cells = {"layers": r["layers"], "d_model": str(r["d_model"]), "params": f"{r['params']:,}",
                 "state (bytes/seq)": f"{r['state_bytes']:,}", "lr": f"{r['lr']:g}", "steps": str(r["steps"]),
                 "accuracy": f"{r['accuracy']:.3f}", "far accuracy": far, "train time": f"{r['train_time_s']:.0f} s"}
        if long_gap is not None:
            cells[f"gaps >= {long_gap}"] = f"{r['long_gap_accuracy']:.3f}"
        first = [r["arch"]] + ([str(r["varied"]["value"])] if varied else [])
        lines.append("| " + " | ".join(first + [cells[c] for c in columns]) + " |")
    return "\n".join(lines)


def median_per_arch(rows: list[dict[str, Any]], key: str = "accuracy") -> dict[str, float]:
    """Each arch's median ``key`` (an accuracy) over its runs (the mean of the middle two for an even count)."""
    return {arch: statistics.median(r[key] for r in rows if r["arch"] == arch)
            for arch in dict.fromkeys(r["arch"] for r in rows)}


def best_per_arch(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The most accurate run of each arch (the first of equals)."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["arch"] not in best or r["accuracy"] > best[r["arch"]]["accuracy"]:
            best[r["arch"]] = r
    return best


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6, 4))


def plot_recall_vs_state(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against state size, one colour per arch: filled at the test lengths, hollow with
    every query at least ``long_gap`` back (when the rows have that test)."""
    plt, fig, ax = _figure()
    for r in rows:
        point = ax.scatter(r["state_bytes"], r["accuracy"], s=50)
        ax.annotate(r["arch"], (r["state_bytes"], r["accuracy"]), textcoords="offset points", xytext=(5, 5))
        if "long_gap_accuracy" in r:
            ax.scatter(r["state_bytes"], r["long_gap_accuracy"], s=50, facecolors="none",
                       edgecolors=point.get_facecolor())
    if rows and "long_gap_accuracy" in rows[0]:
        ax.scatter([], [], s=50, color="gray", label="test lengths")
        ax.scatter([], [], s=50, facecolors="none", edgecolors="gray", label=f"gaps >= {rows[0]['long_gap']}")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("decoder state per sequence (bytes, log scale)")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("Recall vs state size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_varied(rows: list[dict[str, Any]], vary: Variation, path: Path) -> None:
    """Accuracy against the varied setting, one line per arch (log x for ``lr``; categories
    for non-numeric values); the long-gap test is in the table, not in this plot."""
    plt, fig, ax = _figure()
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vary.values)
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = [r for r in rows if r["arch"] == arch]
        xs = [r["varied"]["value"] if numeric else vary.values.index(r["varied"]["value"]) for r in mine]
        ax.plot(xs, [r["accuracy"] for r in mine], marker="o", label=arch)
    if vary.name == "lr":
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(vary.values)), [str(v) for v in vary.values])
    ax.set_xlabel(vary.name)
    ax.set_ylabel("recall accuracy (test lengths)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, settings: DemoSettings, rows: list[dict[str, Any]],
                  vary: Variation | None = None) -> None:
    results = {"settings": dataclasses.asdict(settings), "rows": rows}
    plot = "recall_vs_state.png"
    if vary:
        results["varied"] = dataclasses.asdict(vary)
        if vary.name == "seed":
            results["median_accuracy"] = median_per_arch(rows)
            if rows and "long_gap_accuracy" in rows[0]:
                results["median_long_gap_accuracy"] = median_per_arch(rows, "long_gap_accuracy")
        else:
            results["best"] = {arch: r["varied"]["value"] for arch, r in best_per_arch(rows).items()}
        plot = f"accuracy_vs_{vary.name}.png"
        plot_accuracy_vs_varied(rows, vary, out_dir / plot)
    else:
        plot_recall_vs_state(rows, out_dir / plot)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    fields = ", ".join(f"{k}={v}" for k, v in settings.task_fields.items())
    early_stop = ("" if settings.target_accuracy is None else
                  f" (a run stops early once validation accuracy reaches {settings.target_accuracy})")
    report = [
        "# bmojo demo: transductive recall",
        "",
        f"Task `{settings.task}` ({fields}); trained on lengths {settings.train_lengths}, "
        f"tested on {settings.test_lengths} ({settings.eval_examples} examples). "
        f"At most {settings.max_steps} steps of batch {settings.batch_size}{early_stop}; widths matched to the "
        f"parameter count of `{settings.match_params_of}`. Far accuracy: queries further back than "
        f"window + fading span."
        + ("" if settings.long_gap is None else
           f" Gaps >= {settings.long_gap}: a second test where every query is at least {settings.long_gap} "
           f"positions after its key, on sequences of length {settings.long_gap_length}."),
        "",
        "Base model (each arch uses the fields its layers have): "
        + ", ".join(f"{k}={v}" for k, v in settings.base_model.items()) + ".",
        "",
        format_table(rows),
        "",
    ]
    if vary and vary.name == "seed":
        for key, label in (("median_accuracy", "over the seeds per arch"),
                           ("median_long_gap_accuracy", f"with gaps >= {settings.long_gap}")):
            if key in results:
                medians = ", ".join(f"`{arch}`: {value:.3f}" for arch, value in results[key].items())
                report += [f"Median accuracy {label}: {medians}.", ""]
    elif vary:
        best = ", ".join(f"`{arch}`: {value}" for arch, value in results["best"].items())
        report += [f"Best {vary.name} per arch: {best}.", ""]
    report += [f"![{plot}]({plot})", ""]
    (out_dir / "report.md").write_text("\n".join(report))
