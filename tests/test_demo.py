import dataclasses
import json
import os

import pytest
import torch

from bmojo import LanguageModel
from bmojo.cli import main
from bmojo.config import PRESETS
from bmojo.demo import DemoSettings, default_jobs, run_demo


def test_quick_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["arch"] for r in results["rows"]] == list(PRESETS)
    report = (tmp_path / "report.md").read_text()
    for row in results["rows"]:
        assert f"| {row['arch']} |" in report
        assert 0.0 <= row["accuracy"] <= 1.0 and row["state_bytes"] > 0 and row["train_time_s"] >= 0
        model = LanguageModel.from_pretrained(tmp_path / row["arch"])
        assert model.num_params() == row["params"] and model.state_size_bytes() == row["state_bytes"]
    assert results["settings"]["task"] == "far_recall"
    assert "qkv_conv=4" in report  # the base model's settings are in the report
    png = (tmp_path / "recall_vs_state.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| arch |" in capsys.readouterr().out
    # the second test, every query >= long_gap back: the table's column is what bmojo eval measures
    settings = DemoSettings.quick()
    assert f"gaps >= {settings.long_gap}" in report
    bmojo_row = next(r for r in results["rows"] if r["arch"] == "bmojo")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the demo's default device
    assert main(["eval", "--ckpt", str(tmp_path / "bmojo"), "--gap-min", str(settings.long_gap),
                 "--test-lengths", str(settings.long_gap_length), "--device", device, "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert bmojo_row["long_gap"] == settings.long_gap
    assert bmojo_row["long_gap_accuracy"] == pytest.approx(evaluated["accuracy"], abs=1.5 / evaluated["num_queries"])
    # the memory inspector reads a demo checkpoint
    assert main(["inspect", "--ckpt", str(tmp_path / "bmojo"), "--png", str(tmp_path / "memory.png"),
                 "--device", device]) == 0
    assert "slots filled" in capsys.readouterr().out
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_varies_one_setting_per_arch(tmp_path, capsys):
    argv = ["demo", "--quick", "--out", str(tmp_path), "--no-progress", "--archs", "bmojo",
            "--vary", "eidetic_capacity=0,8", "--max-steps", "12"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["max_steps"] == 12 and all(r["steps"] == 12 for r in results["rows"])
    assert [(r["arch"], r["varied"]["value"]) for r in results["rows"]] == [("bmojo", 0), ("bmojo", 8)]
    for capacity in (0, 8):
        config = LanguageModel.from_pretrained(tmp_path / "bmojo" / f"eidetic_capacity-{capacity}").config
        assert config.eidetic_capacity == capacity
    # widths stay matched on the base model: only the memory differs
    assert results["rows"][0]["d_model"] == results["rows"][1]["d_model"]
    assert results["rows"][0]["state_bytes"] < results["rows"][1]["state_bytes"]
    assert results["best"]["bmojo"] in (0, 8)
    report = (tmp_path / "report.md").read_text()
    assert "| arch | eidetic_capacity |" in report and "Best eidetic_capacity per arch" in report
    assert (tmp_path / "accuracy_vs_eidetic_capacity.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_without_the_long_gap_test(tmp_path):
    """``long_gap=None`` drops the second test, also from the rows of runs reused from a demo that had it."""
    settings = dataclasses.replace(DemoSettings.quick(), max_steps=4)
    run_demo(tmp_path, settings, archs=("swa",), progress=False)
    assert "gaps >= " in (tmp_path / "report.md").read_text()
    rows = run_demo(tmp_path, dataclasses.replace(settings, long_gap=None), archs=("swa",), progress=False)
    assert "long_gap_accuracy" not in rows[0] and "gaps >= " not in (tmp_path / "report.md").read_text()


def test_long_gap_that_does_not_fit_the_task_fails_before_training(tmp_path):
    settings = dataclasses.replace(DemoSettings.quick(), long_gap_length=100)  # gap 160 needs longer sequences
    with pytest.raises(ValueError, match="DemoSettings.long_gap=160 with long_gap_length=100"):
        run_demo(tmp_path, settings, archs=("swa",), progress=False)
    assert not (tmp_path / "swa").exists()


def test_demo_varies_the_seed_and_reports_the_median(tmp_path, capsys):
    argv = ["demo", "--quick", "--out", str(tmp_path), "--no-progress", "--archs", "swa",
            "--vary", "seed=0,1,2", "--max-steps", "4"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    runs = [json.loads((tmp_path / "swa" / f"seed-{seed}" / "run.json").read_text()) for seed in (0, 1, 2)]
    assert [run["train"]["seed"] for run in runs] == [0, 1, 2]
    first, second = (LanguageModel.from_pretrained(tmp_path / "swa" / f"seed-{seed}").state_dict() for seed in (0, 1))
    assert not all(torch.equal(first[name], second[name]) for name in first)  # other weights, other data
    accuracies = sorted(r["accuracy"] for r in results["rows"])
    assert results["median_accuracy"] == {"swa": accuracies[1]} and "best" not in results
    long_gap = sorted(r["long_gap_accuracy"] for r in results["rows"])
    assert results["median_long_gap_accuracy"] == {"swa": long_gap[1]}
    assert "Median accuracy over the seeds per arch: `swa`" in (tmp_path / "report.md").read_text()
    assert main(["eval", "--ckpt", str(tmp_path / "swa" / "seed-0"), "--vary", "seed=1"]) == 2
    assert "--vary seed is for bmojo demo" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--vary", "eidetic_capacity=3"], "eidetic_capacity=3 is invalid"),
    (["--archs", "bmojo,gpt"], "unknown architecture"),
])
def test_demo_rejects_bad_runs_before_training(tmp_path, capsys, argv, message):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*/metrics.jsonl"))


def test_demo_vary_flag_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--vary", "no_such_field=1"])
    assert exit_info.value.code == 2
    assert "cannot vary 'no_such_field'" in capsys.readouterr().err


def test_demo_rerun_reuses_finished_runs_and_resumes_interrupted_ones(tmp_path, capsys):
    argv = ["demo", "--quick", "--out", str(tmp_path), "--no-progress", "--archs", "swa,bmojo", "--max-steps", "6"]
    assert main(argv) == 0
    first = json.loads((tmp_path / "results.json").read_text())["rows"]
    swa_metrics = (tmp_path / "swa" / "metrics.jsonl").read_text()
    (tmp_path / "bmojo" / "demo_row.json").unlink()  # as if killed after training, before its row was written
    swa_row = json.loads((tmp_path / "swa" / "demo_row.json").read_text())
    del swa_row["long_gap"], swa_row["long_gap_accuracy"]  # a row written before the long-gap test existed
    (tmp_path / "swa" / "demo_row.json").write_text(json.dumps(swa_row))
    assert main(argv) == 0
    second = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert (tmp_path / "swa" / "metrics.jsonl").read_text() == swa_metrics  # reused, not retrained
    keys = ("arch", "steps", "accuracy", "long_gap", "long_gap_accuracy")
    assert [[r[k] for k in keys] for r in second] == [[r[k] for k in keys] for r in first]
    # the same directory with other settings is refused rather than overwritten
    assert main([*argv[:-1], "8"]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


def test_runs_side_by_side_give_the_same_table_as_one_after_another(tmp_path):
    """Every run trains on a fixed number of threads, so --jobs changes the wall time only."""
    argv = ["demo", "--quick", "--no-progress", "--archs", "mamba2,bmojo", "--max-steps", "8"]
    assert main([*argv, "--out", str(tmp_path / "one"), "--jobs", "1"]) == 0
    assert main([*argv, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = (json.loads((tmp_path / name / "results.json").read_text())["rows"] for name in ("one", "two"))
    keys = ("arch", "params", "state_bytes", "steps", "accuracy", "far_accuracy", "by_distance", "long_gap_accuracy")
    assert [[r[k] for k in keys] for r in two] == [[r[k] for k in keys] for r in one]
    for arch in ("mamba2", "bmojo"):  # the weights themselves, bit for bit
        a = LanguageModel.from_pretrained(tmp_path / "one" / arch).state_dict()
        b = LanguageModel.from_pretrained(tmp_path / "two" / arch).state_dict()
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_run_failing_in_a_worker_stops_the_demo_with_its_error(tmp_path):
    settings = DemoSettings.quick()
    with pytest.raises(RuntimeError, match="cpux"):
        run_demo(tmp_path, settings, device="cpux", progress=False, archs=("swa", "bmojo"), jobs=2)


def test_default_jobs_one_per_core_and_one_on_a_gpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_jobs("cpu", runs=6) == 4
    assert default_jobs("cpu", runs=3) == 3
    assert default_jobs("cuda", runs=6) == 1
