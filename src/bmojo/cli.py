"""The `bmojo` command line: `demo`, `data`, `train`, `eval`, `generate`, `inspect`, `curves`, `bench`, `smoke`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bmojo import __version__
from bmojo.allocator import keep_freed_memory
from bmojo.bench import add_bench_parser
from bmojo.config import LM_SIZES, PRESETS, ModelConfig
from bmojo.data.prepare import add_data_parser
from bmojo.data.synthetic import TASKS
from bmojo.device import KERNEL_FIELDS, require_kernels_run_on
from bmojo.ops.attention import ATTENTION_KERNELS
from bmojo.ops.ssd import SSD_KERNELS
from bmojo.training.distributed import Distributed, launched_by_torchrun, run_distributed
from bmojo.training.trainer import TrainConfig, TrainingDiverged

if TYPE_CHECKING:
    from bmojo.models.lm import LanguageModel

# Fields the run sets itself: the vocabulary comes from the task, the context from the test lengths.
MODEL_FIELDS_SET_BY_RUN = {"arch", "vocab_size", "max_seq_len"}
TASK_FIELDS_SET_BY_RUN = {"seq_len"}
LM_RUN_FLAGS = ("data", "size", "seq_len", "eval_tokens")  # run fields of --task lm


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parse_value(text: str, hint: Any) -> Any:
    """Parse one command-line value for a dataclass field annotated ``hint``."""
    args = typing.get_args(hint)
    if type(None) in args:
        if text.lower() == "none":
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return hint(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected {hint.__name__}, got {text!r}") from err


def _field_specs(cls: type, skip: set[str]) -> dict[str, tuple[Any, Any]]:
    """``name -> (type hint, default)`` for the fields of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(cls)
            if f.name not in skip and not f.name.startswith("_")}


def _task_field_specs() -> dict[str, tuple[Any, Any]]:
    specs: dict[str, tuple[Any, Any]] = {}
    for task in TASKS.values():
        specs.update(_field_specs(task.config_class, TASK_FIELDS_SET_BY_RUN))
    return specs


def _add_fields(group, specs: dict[str, tuple[Any, Any]], as_list: bool = False,
                default_note: str | None = None) -> None:
    """One ``--flag`` per field (``dest`` = ``<group title>.<field>``, absent from the namespace
    when not given, so that ``--flag none`` can override a config file's value with ``None``);
    ``default_note`` replaces the field's default in the help."""
    for name, (hint, default) in specs.items():
        def parse(text, hint=hint):
            values = [_parse_value(part, hint) for part in text.split(",")]
            return values if as_list and len(values) > 1 else values[0]
        list_note = " (a comma list makes a mixture)" if as_list else ""
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"{group.title}.{name}", type=parse,
                           default=argparse.SUPPRESS,
                           metavar=getattr(hint, "__name__", "VALUE").upper(),
                           help=f"default: {default if default_note is None else default_note}{list_note}")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be >= 1, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use JSON") from err
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of run fields")
    return data


def _run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run spec: the config file, then every flag given on the command line."""
    spec = _read_config_file(args.config) if args.config else {}
    for key in ("task", "arch", "train_lengths", "test_lengths", "eval_examples", *LM_RUN_FLAGS):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    lm = spec.get("task") == "lm"
    flags_of_other_task = LM_RUN_FLAGS if not lm else ("train_lengths", "test_lengths", "eval_examples")
    misplaced = [key for key in flags_of_other_task if spec.get(key) is not None]
    for section, key in (("model", "model"), ("training", "train"), ("task", "task_fields")):
        given = {name.split(".", 1)[1]: value for name, value in vars(args).items()
                 if name.startswith(f"{section}.")}
        if lm and section == "task":
            misplaced += list(given)
            continue
        spec[key] = {**spec.get(key, {}), **given}
    if misplaced:
        kind = "synthetic recall tasks" if lm else "--task lm"
        raise ValueError(f"{', '.join(sorted(misplaced))}: only for {kind}")
    if lm and not spec.get("data"):
        raise ValueError("--task lm needs --data DIR (made by bmojo data prepare)")
    return spec


def _train_one(args: argparse.Namespace, spec: dict[str, Any], run_dir: Path, distributed: Distributed,
               device: str | None) -> dict[str, Any]:
    """Train the run ``spec`` into ``run_dir``; its summary for a sweep table. Rank 0 alone prints."""
    say = print if distributed.is_main else (lambda *_, **__: None)
    common = dict(resume=args.resume, device=device, progress=not args.no_progress, distributed=distributed)
    if spec.get("task") == "lm":
        from bmojo.training.lm import LMRun, train_lm

        run = LMRun.from_dict(spec)
        say(f"training {run.arch} ({run.model_config().layer_pattern} layers, size {run.size}) on {run.data} "
            f"(lr {run.train.lr:g}) -> {run_dir}", file=sys.stderr)
        result = train_lm(run, run_dir, **common)
        ppl = result.eval_metrics.get("ppl", float("nan"))
        say(f"validation perplexity {ppl:.3f} after {result.steps} steps")
        return {"steps": result.steps, "val_ppl": ppl}
    from bmojo.training.recall import RecallRun, train_recall

    run = RecallRun.from_dict(spec)
    say(f"training {run.arch} on {run.task} (lr {run.train.lr:g}, {run.model_config().layer_pattern} layers) "
        f"-> {run_dir}", file=sys.stderr)
    result, report = train_recall(run, run_dir, **common)
    say(report.format())
    return {"steps": result.steps, "accuracy": report.accuracy, "far_accuracy": report.far_accuracy}


def cmd_train(args: argparse.Namespace) -> int:
    """Train in this process, or, under torchrun, as one process of a data-parallel job
    (DDP, or FSDP2 with --fsdp), which ends the process (bmojo.training.distributed)."""
    if not launched_by_torchrun():
        if args.fsdp:
            raise ValueError("--fsdp shards the model across processes started by torchrun: run "
                             "torchrun --nproc_per_node=N -m bmojo train ... --fsdp")
        return _train_runs(args, Distributed(), args.device)
    run_distributed(lambda distributed, device: _train_runs(args, distributed, str(device)), device=args.device,
                    fsdp=args.fsdp)


def _train_runs(args: argparse.Namespace, distributed: Distributed, device: str | None) -> int:
    """The run, or one run per learning rate of a sweep, and the sweep's table."""
    spec = _run_from_args(args)
    lrs = args.lr or [spec.get("train", {}).get("lr", TrainConfig.lr)]
    out = Path(args.out)
    results = []
    for lr in lrs:
        run_dir = out if len(lrs) == 1 else out / f"lr-{lr:g}"
        try:
            summary = _train_one(args, {**spec, "train": {**spec.get("train", {}), "lr": lr}}, run_dir,
                                 distributed, device)
        except TrainingDiverged as err:
            if distributed.is_main:
                print(f"error: {err}", file=sys.stderr)
            if len(lrs) == 1:
                return 1
            continue
        results.append({"lr": lr, "dir": str(run_dir), **summary})
    if len(lrs) > 1 and not results:
        if distributed.is_main:
            print("error: every learning rate diverged", file=sys.stderr)
        return 1
    if len(lrs) > 1 and distributed.is_main:
        lm = spec.get("task") == "lm"
        best = min(results, key=lambda r: r["val_ppl"]) if lm else max(results, key=lambda r: r["accuracy"])
        columns = ["val_ppl"] if lm else ["accuracy", "far_accuracy"]
        print("\n" + f"{'lr':>10} {'steps':>7} " + " ".join(f"{c:>12}" for c in columns))
        for r in results:
            cells = " ".join(f"{'-' if r[c] is None else format(r[c], '.3f'):>12}" for c in columns)
            print(f"{r['lr']:>10g} {r['steps']:>7} {cells}{'  <- best' if r is best else ''}")
        (out / "sweep.json").write_text(json.dumps({"arch": spec.get("arch"), "results": results, "best": best},
                                                   indent=2))
    return 0


def _load_checkpoint(ckpt: str, args: argparse.Namespace, device: str = "cpu") -> LanguageModel:
    """``ckpt``'s model on ``device``, computing with the kernels that ``--attention-kernel``,
    ``--ssd-kernel`` and ``bmojo eval --set`` choose (default: the checkpoint's). Checked before the
    model is built: a ``ValueError`` naming the flags that choose PyTorch's ops when a Triton
    kernel cannot run on ``device`` (off CUDA, or triton missing)."""
    from bmojo.models.lm import LanguageModel

    kernels = {field: getattr(args, field) for field in KERNEL_FIELDS if getattr(args, field) is not None}
    kernels.update({setting.name: setting.values[0] for setting in getattr(args, "set", [])
                    if setting.name in KERNEL_FIELDS})
    config = LanguageModel.saved_config(ckpt, **kernels)
    try:
        require_kernels_run_on(config, device)
    except ValueError as err:
        flags = " ".join(f"--{field.replace('_', '-')} torch" for field in KERNEL_FIELDS
                         if getattr(config, field) == "triton")
        raise ValueError(f"{ckpt}: {err} (with {flags}, PyTorch's ops compute the same)") from None
    return LanguageModel.from_pretrained(ckpt, device=device, **kernels)


def _add_kernel_flags(parser: argparse.ArgumentParser) -> None:
    """``--attention-kernel`` and ``--ssd-kernel`` for a command that loads a checkpoint."""
    for field, kernels in zip(KERNEL_FIELDS, (ATTENTION_KERNELS, SSD_KERNELS), strict=True):
        parser.add_argument(f"--{field.replace('_', '-')}", choices=kernels, default=None,
                            help=f"the model's {field} to compute with (same results; default: the checkpoint's)")


def cmd_eval_lm(args: argparse.Namespace) -> int:
    from bmojo.data.shards import TokenShards
    from bmojo.evaluation.perplexity import perplexity_at, plot_perplexity

    if not args.data or not args.lengths:
        raise ValueError("--task lm needs --data DIR and --lengths A,B,...")
    shards = TokenShards(args.data)
    stream = shards.tokens("val")
    curves, train_lengths, table = {}, {}, {}
    for ckpt in args.ckpt:
        model = _load_checkpoint(ckpt, args, args.device or "cpu")
        if model.config.vocab_size != shards.vocab_size:
            raise ValueError(f"{ckpt} has vocabulary {model.config.vocab_size}, {args.data} has "
                             f"{shards.vocab_size}: not the same tokenizer")
        run_file = Path(ckpt) / "run.json"
        if run_file.is_file():
            train_lengths[ckpt] = json.loads(run_file.read_text()).get("seq_len")
        curves[ckpt] = []
        for length in args.lengths:
            result = perplexity_at(model, stream, length, max_tokens=args.max_tokens,
                                   parallel_tokens=args.parallel_tokens)
            curves[ckpt].append(result)
            print(f"{ckpt}  length {length:>7,}  tokens {result.tokens:>9,}  perplexity {result.perplexity:.4f}")
        table[ckpt] = {str(r.context): {"tokens": r.tokens, "ppl": r.perplexity} for r in curves[ckpt]}
    png = Path(args.png) if args.png else Path(args.ckpt[0]) / "perplexity_vs_length.png"
    plot_perplexity(curves, png, {k: v for k, v in train_lengths.items() if v})
    print(f"plot: {png}")
    if args.json:
        print(json.dumps({"data": args.data, "results": table}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bmojo.training.recall import RecallRun, evaluate_run

    if args.task == "lm":
        return cmd_eval_lm(args)
    if len(args.ckpt) != 1:
        raise ValueError("several --ckpt are for --task lm; evaluate recall checkpoints one at a time")
    args.ckpt = args.ckpt[0]
    model = _load_checkpoint(args.ckpt, args, args.device or "cpu")
    saved = RecallRun.load(args.ckpt).to_dict() if (Path(args.ckpt) / "run.json").is_file() else {}
    spec = {**saved, "arch": model.config.arch, "model": model.config.to_dict()}
    spec["model"] = {k: v for k, v in spec["model"].items() if k not in MODEL_FIELDS_SET_BY_RUN}
    for key in ("task", "test_lengths", "eval_examples"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if spec.get("task") is None:
        raise ValueError(f"{args.ckpt} has no run.json: say which task to evaluate with --task")
    changed = {key.split(".", 1)[1]: value for key, value in vars(args).items()
               if key.startswith("task.")}
    if changed:
        spec["task_fields"] = {**spec.get("task_fields", {}), **changed}
        if spec.get("test_lengths"):  # only test sequences are made: training lengths need not fit the change
            spec["train_lengths"] = spec["test_lengths"]
    run = RecallRun.from_dict(spec)
    if run.vocab_size != model.config.vocab_size:
        raise ValueError(f"task vocabulary {run.vocab_size} differs from the model's {model.config.vocab_size}")
    if args.set:
        from bmojo.evaluation.ablation import with_settings

        model = with_settings(model, **{variation.name: variation.values[0] for variation in args.set})
    if args.vary is not None:
        return _eval_ablation(args, model, run, evaluate_run)
    report = evaluate_run(model, run)
    print(report.format())
    if args.json:
        print(json.dumps(dataclasses.asdict(report)))
    return 0


def _eval_ablation(args: argparse.Namespace, model, run, evaluate_run) -> int:
    """``bmojo eval --vary NAME=V1,...``: the trained model rebuilt with each value (no retraining)."""
    from bmojo.demo import TRAINING_VARIATIONS, plot_accuracy_vs_varied
    from bmojo.evaluation.ablation import with_settings

    vary = args.vary
    if vary.name in TRAINING_VARIATIONS:
        raise ValueError(f"--vary {vary.name} is for bmojo demo: evaluation varies model settings only")
    for value in vary.values if vary.name in KERNEL_FIELDS else []:  # before any value is evaluated
        require_kernels_run_on(dataclasses.replace(model.config, **{vary.name: value}), model.embed.weight.device)
    rows = []
    for value in vary.values:
        report = evaluate_run(with_settings(model, **{vary.name: value}), run)
        rows.append({"arch": run.arch, "varied": {"name": vary.name, "value": value}, "accuracy": report.accuracy,
                     "far_accuracy": report.far_accuracy})
    trained = getattr(model.config, vary.name)
    print(f"{vary.name:>20} {'accuracy':>9} {'far acc':>8}")
    for r in rows:
        far = "-" if r["far_accuracy"] is None else f"{r['far_accuracy']:.3f}"
        mark = "  <- as trained" if r["varied"]["value"] == trained else ""
        print(f"{r['varied']['value']!s:>20} {r['accuracy']:>9.3f} {far:>8}{mark}")
    png = Path(args.ckpt) / f"ablation_{vary.name}.png"
    plot_accuracy_vs_varied(rows, vary, png)
    print(f"plot: {png}")
    if args.json:
        print(json.dumps({"name": vary.name, "trained": trained, "rows": rows}))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from bmojo.data.synthetic import make_dataset
    from bmojo.evaluation.memory import inspect_memory, plot_memory
    from bmojo.training.recall import RecallRun

    model = _load_checkpoint(args.ckpt, args, args.device or "cpu")
    saved = RecallRun.load(args.ckpt) if (Path(args.ckpt) / "run.json").is_file() else None
    task = args.task or (saved.task if saved else None)
    if task is None:
        raise ValueError(f"{args.ckpt} has no run.json: say which task to inspect with --task")
    fields = saved.task_fields if saved and saved.task == task else {"vocab_size": model.config.vocab_size}
    fields = {k: v[0] if isinstance(v, list) else v for k, v in fields.items()}
    length = args.length or (saved.test_lengths[0] if saved else 128)
    example = make_dataset(task, num_examples=1, split="test", seed=args.seed, lengths=[length], **fields)[0]
    inspection = inspect_memory(model, example)
    print(inspection.format())
    png = Path(args.png) if args.png else Path(args.ckpt) / "memory.png"
    plot_memory(inspection, png)
    print(f"heat map: {png}")
    return 0


def cmd_curves(args: argparse.Namespace) -> int:
    from bmojo.evaluation.curves import format_curves, plot_curves, read_curve

    labels = args.labels.split(",") if args.labels is not None else [None] * len(args.runs)
    if len(labels) != len(args.runs):
        raise ValueError(f"--labels names {len(labels)} run(s), but {len(args.runs)} were given")
    try:
        curves = [read_curve(run, args.metric, label) for run, label in zip(args.runs, labels, strict=True)]
        print(format_curves(curves))
        png = plot_curves(curves, args.png, args.log_y)
    except OSError as err:  # a missing or unreadable metrics file, an unwritable plot path
        raise ValueError(str(err)) from err
    print(f"plot: {png}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from bmojo.data.tokenizer import load_tokenizer
    from bmojo.models.sampling import stream_generate

    model = _load_checkpoint(args.ckpt, args, args.device or "cpu").eval()
    tokenizer = load_tokenizer(args.ckpt)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt is empty: give at least one character")
    print(args.prompt, end="", flush=True)
    new_ids: list[int] = []
    shown = ""
    tokens = torch.tensor([prompt])
    cache = None
    if args.storage:
        Path(args.storage).mkdir(parents=True, exist_ok=True)
        cache = model.new_cache(1, storage_dir=args.storage)
    for token in stream_generate(model, tokens, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                 args.seed, cache=cache, prefill_piece=args.prefill_piece):
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # hold back a character whose bytes are still coming
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tokenizer.decode(new_ids)[len(shown):])
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from bmojo.smoke import format_table, smoke_all

    device = torch.device(args.device) if args.device else None
    results = smoke_all(steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                        decode_tokens=args.decode_tokens, device=device)
    print(format_table(results))
    not_learning = [r.arch for r in results if not r.last_loss < r.first_loss]
    if not_learning:
        print(f"error: loss did not decrease for {not_learning}", file=sys.stderr)
        return 1
    return 0


def _setting(text: str):
    """``NAME=VALUE`` -> a :class:`bmojo.demo.Variation` of one value, typed like the field."""
    variation = _variation(text)
    if len(variation.values) != 1:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (one value), got {text!r}")
    return variation


def _variation(text: str):
    """``NAME=V1,V2,...`` -> :class:`bmojo.demo.Variation`, values typed like the field."""
    from bmojo.demo import Variation

    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not values:
        raise argparse.ArgumentTypeError(f"expected NAME=V1,V2,..., got {text!r}")
    hints = {**typing.get_type_hints(ModelConfig), "lr": float, "seed": int}
    try:
        return Variation(name, [_parse_value(v.strip(), hints.get(name, str)) for v in values.split(",")])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def cmd_demo(args: argparse.Namespace) -> int:
    from bmojo.demo import DemoSettings, format_table, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.max_steps is not None:
        settings.max_steps = args.max_steps
    archs = tuple(args.archs.split(",")) if args.archs else tuple(PRESETS)
    rows = run_demo(args.out, settings, device=args.device, progress=not args.no_progress, archs=archs,
                    vary=args.vary, jobs=args.jobs)
    print(format_table(rows))
    print(f"\nwrote {Path(args.out) / 'report.md'}, a plot, results.json and a checkpoint per run")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bmojo", description="B'MOJO hybrid state-space language models.")
    parser.add_argument("--version", action="version", version=f"bmojo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the recall comparison of all six architectures (the main job)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--quick", action="store_true", help="tiny models and few steps (about a minute)")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--max-steps", type=positive_int, default=None,
                      help="training steps per run; none: the settings' budget (1000, or 30 with --quick)")
    demo.add_argument("--archs", default=None, help="comma list of architectures; none: all six")
    demo.add_argument("--vary", type=_variation, default=None, metavar="NAME=V1,V2,...",
                      help="train each arch once per value of lr, seed or a model field, e.g. "
                           "eidetic_capacity=0,4,8,16 or selection=topk,random,recent or lr=1e-3,3e-3,1e-2; "
                           "seed=0,1,2 also reports each arch's median")
    demo.add_argument("--device", default=None, help="torch device; none: cuda if available, else cpu")
    demo.add_argument("--jobs", type=positive_int, default=None,
                      help="runs trained side by side, one thread each (the results do not depend on it); "
                           "none: one per CPU core, one on a GPU")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    add_data_parser(sub)
    add_bench_parser(sub)

    inspect = sub.add_parser("inspect", help="show what a B'MOJO checkpoint holds in eidetic memory")
    inspect.add_argument("--ckpt", required=True, help="checkpoint directory (from bmojo train)")
    inspect.add_argument("--task", choices=list(TASKS), default=None, help="default: the task it was trained on")
    inspect.add_argument("--length", type=positive_int, default=None, help="default: the run's first test length")
    inspect.add_argument("--seed", type=int, default=0, help="which test example")
    inspect.add_argument("--png", default=None, help="heat map path (default: CKPT/memory.png)")
    inspect.add_argument("--device", default=None, help="torch device (default: cpu)")
    _add_kernel_flags(inspect)
    inspect.set_defaults(func=cmd_inspect)

    curves = sub.add_parser("curves", help="learning curves of training runs: a metric against the step",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    curves.add_argument("runs", nargs="+", help="run directories (the --out of bmojo train)")
    curves.add_argument("--metric", default="eval_accuracy",
                        help="a metric of the runs' metrics.jsonl, e.g. eval_accuracy, loss, accuracy, grad_norm")
    curves.add_argument("--labels", default=None, help="comma list, one per run; none: the directory names")
    curves.add_argument("--png", default="curves.png", help="plot path")
    curves.add_argument("--log-y", action="store_true", help="logarithmic y axis (for losses)")
    curves.set_defaults(func=cmd_curves)

    smoke = sub.add_parser("smoke", help="build, train a few steps and decode every preset (seconds)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    smoke.add_argument("--steps", type=positive_int, default=30, help="training steps per architecture")
    smoke.add_argument("--batch", type=positive_int, default=4, help="sequences per step")
    smoke.add_argument("--seq-len", type=positive_int, default=96, help="tokens per sequence")
    smoke.add_argument("--decode-tokens", type=positive_int, default=16, help="tokens decoded after training")
    smoke.add_argument("--device", default=None, help="torch device; none: cuda if available, else cpu")
    smoke.set_defaults(func=cmd_smoke)

    train = sub.add_parser("train", help="train a model on a synthetic recall task or on text",
                           description="Train one architecture on a recall task and evaluate it on longer "
                                       "test sequences, or on text (--task lm). Flags override the --config file. "
                                       "Launched by torchrun (torchrun --nproc_per_node=N -m bmojo train ...), "
                                       "every process trains on its share of each global batch: DDP, or FSDP2 with "
                                       "--fsdp (docs/distributed.md).")
    train.add_argument("--task", choices=[*TASKS, "lm"], default=None,
                       help="a synthetic recall task or lm (language modelling on --data); default: mqar")
    train.add_argument("--arch", choices=list(PRESETS), default=None, help="default: bmojo")
    train.add_argument("--config", default=None, help="JSON (or YAML) file with run fields")
    train.add_argument("--out", default="runs/train", help="output directory (default: runs/train)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--train-lengths", type=_int_list, default=None, help="default: 64,128")
    train.add_argument("--test-lengths", type=_int_list, default=None, help="default: 256,512")
    train.add_argument("--eval-examples", type=positive_int, default=None, help="default: 512")
    train.add_argument("--lr", type=_float_list, default=None,
                       help=f"learning rate; a comma list runs a sweep (default: {TrainConfig.lr})")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard parameters, gradients and optimizer state over the processes "
                            "(FSDP2) instead of replicating them (DDP); checkpoints are then sharded")
    lm_group = train.add_argument_group("language modelling (--task lm)")
    lm_group.add_argument("--data", default=None, help="token shards directory (from bmojo data prepare)")
    lm_group.add_argument("--size", choices=list(LM_SIZES), default=None,
                          help="model shapes, widths matched across archs (default: laptop)")
    lm_group.add_argument("--seq-len", type=positive_int, default=None, help="training window (default: 256)")
    lm_group.add_argument("--eval-tokens", type=positive_int, default=None,
                          help="validation tokens per evaluation (default: 32768)")
    model_group = train.add_argument_group("model")
    _add_fields(model_group, _field_specs(ModelConfig, MODEL_FIELDS_SET_BY_RUN))
    training_group = train.add_argument_group("training")
    _add_fields(training_group, _field_specs(TrainConfig, {"lr"}))
    task_group = train.add_argument_group("task")
    _add_fields(task_group, _task_field_specs(), as_list=True)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint: recall accuracy, or perplexity by context length")
    evaluate.add_argument("--ckpt", required=True, action="append",
                          help="checkpoint directory (from bmojo train); repeat it to compare (--task lm)")
    evaluate.add_argument("--task", choices=[*TASKS, "lm"], default=None,
                          help="default: the task it was trained on")
    evaluate.add_argument("--data", default=None, help="--task lm: token shards (validation split is used)")
    evaluate.add_argument("--lengths", type=_int_list, default=None, help="--task lm: context lengths A,B,...")
    evaluate.add_argument("--max-tokens", type=positive_int, default=262144,
                          help="--task lm: predicted tokens per length at most")
    evaluate.add_argument("--parallel-tokens", type=positive_int, default=2048,
                          help="--task lm: a longer window is read in pieces of this many positions, each a "
                               "parallel forward continuing the decoding cache (chunked prefill), so memory stays "
                               "bounded (default: 2048)")
    evaluate.add_argument("--png", default=None,
                          help="--task lm: plot path (default: FIRST_CKPT/perplexity_vs_length.png)")
    evaluate.add_argument("--test-lengths", type=_int_list, default=None, help="default: the run's")
    evaluate.add_argument("--eval-examples", type=positive_int, default=None, help="default: the run's")
    evaluate.add_argument("--device", default=None)
    _add_kernel_flags(evaluate)
    evaluate.add_argument("--vary", type=_variation, default=None, metavar="NAME=V1,V2,...",
                          help="recall: evaluate the trained model rebuilt with each value of a setting that needs "
                               "no new weights, e.g. eidetic_capacity=0,4,8,16 or selection=topk,random,recent")
    evaluate.add_argument("--set", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                          help="recall: evaluate the trained model rebuilt with this setting (no new weights; "
                               "repeatable, applied before --vary), e.g. storage_blocks=4")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    eval_task_group = evaluate.add_argument_group("task", "recall: change a field of the task the model is tested on")
    _add_fields(eval_task_group, _task_field_specs(), default_note="the run's")
    evaluate.set_defaults(func=cmd_eval)

    generate = sub.add_parser("generate", help="stream text from a language-model checkpoint",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    generate.add_argument("--ckpt", required=True, help="checkpoint directory (from bmojo train --task lm)")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    generate.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely")
    generate.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    generate.add_argument("--storage", default=None, metavar="DIR",
                          help="keep the block stores of a model with storage_blocks > 0 in memory-mapped files "
                               "in DIR instead of RAM (DESIGN.md §5)")
    generate.add_argument("--prefill-piece", type=positive_int, default=None, metavar="N",
                          help="read the prompt in pieces of N tokens (chunked prefill: same output, memory "
                               "bounded by N instead of the prompt's length)")
    generate.add_argument("--device", default=None, help="torch device; none: cpu")
    _add_kernel_flags(generate)
    generate.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "keep_freed_memory", True):  # a command that measures process memory says False
        keep_freed_memory()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
