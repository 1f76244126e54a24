import json
import subprocess
import sys

from bmojo.cli import main
from bmojo.config import PRESETS


def test_smoke_runs_every_preset_and_prints_the_table(capsys):
    code = main(["smoke", "--steps", "3", "--batch", "2", "--seq-len", "24", "--decode-tokens", "3"])
    out = capsys.readouterr().out
    assert code == 0
    for name in PRESETS:
        assert f"\n{name} " in out
    assert "state bytes" in out and "loss last" in out


def test_bad_arguments_are_usage_errors_not_tracebacks():
    result = subprocess.run([sys.executable, "-m", "bmojo", "smoke", "--steps", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "must be >= 1" in result.stderr and "Traceback" not in result.stderr


def test_version():
    result = subprocess.run([sys.executable, "-m", "bmojo", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("bmojo ")


def test_bench_is_a_subcommand(capsys):
    assert main(["bench", "ops", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["results"] and all(row["ratio"] > 0 for row in result["results"] if not row["skipped"])
