import json
from pathlib import Path

import pytest

from bmojo.cli import main
from bmojo.evaluation.curves import Curve, format_curves, read_curve

TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--window", "8", "--ssm-headdim", "16",
        "--d-state", "8", "--mlp-ratio", "0", "--vocab-size", "32", "--num-kv-pairs", "2",
        "--train-lengths", "24", "--test-lengths", "48", "--eval-examples", "16", "--batch-size", "4",
        "--log-every", "1", "--no-progress"]


def write_metrics(run: Path, records: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run


def test_reads_one_metric_in_step_order(tmp_path):
    run = write_metrics(tmp_path / "a", [{"step": 0, "event": "precision", "precision": "fp32"},
                                         {"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0},
                                         {"step": 20, "eval_accuracy": 0.25}, {"step": 40, "eval_accuracy": 0.5}])
    curve = read_curve(run)
    assert (curve.label, curve.metric, curve.steps, curve.values) == ("a", "eval_accuracy", [20, 40], [0.25, 0.5])
    assert read_curve(run, "loss", label="mine") == Curve("mine", "loss", [10, 20], [3.0, 2.0])


def test_a_step_logged_twice_keeps_its_later_record(tmp_path):
    run = write_metrics(tmp_path / "r", [{"step": 20, "loss": 2.0}, {"step": 30, "loss": 1.9},
                                         {"step": 30, "loss": 1.7}, {"step": 40, "loss": 1.5}])
    assert read_curve(run, "loss").values == [2.0, 1.7, 1.5]


def test_a_partial_last_line_is_skipped_and_a_broken_line_elsewhere_is_an_error(tmp_path):
    killed = write_metrics(tmp_path / "k", [{"step": 10, "loss": 2.0}], tail='{"step": 20, "lo')
    assert read_curve(killed, "loss").steps == [10]
    broken = write_metrics(tmp_path / "b", [], tail='{"step": 10,\n{"step": 20, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 1: not JSON"):
        read_curve(broken, "loss")


@pytest.mark.parametrize("line", ["3", "null", '["step", 10]', '{"loss": 1.0}', '{"step": "ten", "loss": 1.0}'])
def test_a_line_that_is_not_a_record_is_an_error(tmp_path, line):
    run = write_metrics(tmp_path / "a", [{"step": 10, "loss": 2.0}], tail=line + "\n" + '{"step": 20, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 2: not a metrics record"):
        read_curve(run, "loss")


def test_unknown_or_non_numeric_metric_and_missing_run_say_what_exists(tmp_path):
    run = write_metrics(tmp_path / "a", [{"step": 0, "event": "precision", "precision": "fp32"},
                                         {"step": 10, "loss": 3.0, "lr": 1e-3, "skipped": True}])
    for metric in ("eval_loss", "precision", "skipped"):
        expected = rf"no numeric '{metric}' records; its numeric metrics are \['loss', 'lr'\]"
        with pytest.raises(ValueError, match=expected):
            read_curve(run, metric)
    with pytest.raises(FileNotFoundError, match="bmojo train"):
        read_curve(tmp_path / "missing")


def test_table_has_a_row_per_logged_step_and_a_dash_where_a_run_has_none():
    table = format_curves([Curve("fast", "m", [100, 200], [0.5, 0.96]), Curve("slow", "m", [100, 300], [0.1, 0.2])])
    rows = [line.split() for line in table.splitlines()]
    assert rows == [["step", "fast", "slow"], ["100", "0.5", "0.1"], ["200", "0.96", "-"], ["300", "-", "0.2"]]


def test_curves_command_on_real_training_runs(tmp_path, capsys):
    for name, lr in (("low", "1e-3"), ("high", "1e-2")):
        assert main(["train", "--task", "mqar", "--arch", "bmojo", "--out", str(tmp_path / name), "--max-steps", "4",
                     "--eval-every", "2", "--lr", lr, *TINY]) == 0
    capsys.readouterr()
    png = tmp_path / "curves.png"
    assert main(["curves", str(tmp_path / "low"), str(tmp_path / "high"), "--labels", "lr 1e-3,lr 1e-2",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["step", "lr", "1e-3", "lr", "1e-2"]
    assert [row.split()[0] for row in out[1:3]] == ["2", "4"]  # the evaluations of --eval-every 2
    assert png.stat().st_size > 0 and out[-1] == f"plot: {png}"
    assert main(["curves", str(tmp_path / "low"), "--labels", "a,b", "--png", str(png)]) == 2
    assert "--labels names 2 run(s), but 1 were given" in capsys.readouterr().err
    assert main(["curves", str(tmp_path / "low"), "--png", str(tmp_path / "no-suffix")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"plot: {tmp_path / 'no-suffix.png'}"
    assert (tmp_path / "no-suffix.png").stat().st_size > 0
    (tmp_path / "taken.png").mkdir()  # a directory where the plot should go: one line, exit code 2
    assert main(["curves", str(tmp_path / "low"), "--png", str(tmp_path / "taken.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "taken.png" in err and "Traceback" not in err
