import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bmojo import LanguageModel
from bmojo.cli import main
from bmojo.training.checkpoint import is_sharded_checkpoint

TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--window", "8", "--ssm-headdim", "16",
        "--d-state", "8", "--mlp-ratio", "0", "--vocab-size", "32", "--num-kv-pairs", "2,4",
        "--train-lengths", "24", "--test-lengths", "48", "--eval-examples", "16", "--batch-size", "4",
        "--eval-every", "2", "--checkpoint-every", "2", "--log-every", "1", "--no-progress"]


def bmojo(*args):
    return subprocess.run([sys.executable, "-m", "bmojo", *args], capture_output=True, text=True)


def torchrun_bmojo(*args, nproc=2):
    """``torchrun --nproc_per_node=NPROC -m bmojo ARGS`` on CPU (gloo)."""
    src = str(Path(sys.modules["bmojo"].__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "bmojo", *args], capture_output=True, text=True, env=env, timeout=240)


def test_train_then_eval(tmp_path, capsys):
    assert main(["train", "--task", "mqar", "--arch", "bmojo", "--out", str(tmp_path), "--max-steps", "4",
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "by kv pairs: 2:" in out and "by distance" in out
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["task"] == "mqar" and run["task_fields"]["num_kv_pairs"] == [2, 4] and run["model"]["window"] == 8
    model = LanguageModel.from_pretrained(tmp_path)
    assert model.config.vocab_size == 32 and model.config.layer_pattern == "B"
    assert main(["eval", "--ckpt", str(tmp_path), "--test-lengths", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["by_kv_pairs"]) == {"2", "4"} and 0.0 <= report["accuracy"] <= 1.0


def test_resume_refuses_changed_settings(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path), *TINY]
    assert main([*args, "--max-steps", "4"]) == 0
    capsys.readouterr()
    assert main([*args, "--max-steps", "6", "--resume"]) == 2  # other settings: another run
    assert "started with different settings" in capsys.readouterr().err
    assert main([*args, "--max-steps", "4", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4


def test_learning_rate_sweep_reports_the_best(tmp_path, capsys):
    assert main(["train", "--arch", "swa", "--out", str(tmp_path), "--max-steps", "2", "--lr", "1e-3,3e-3",
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert "<- best" in out
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["lr"] for r in sweep["results"]] == [1e-3, 3e-3]
    assert sweep["best"]["accuracy"] == max(r["accuracy"] for r in sweep["results"])
    assert (tmp_path / "lr-0.001" / "model.safetensors").is_file()


def test_config_file_with_overrides(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"task": "far_recall", "arch": "mamba2", "task_fields": {"gap_min": 12},
                                  "train": {"max_steps": 2}}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "out"), *TINY]) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["task"] == "far_recall" and run["arch"] == "mamba2" and run["train"]["max_steps"] == 2
    assert run["task_fields"]["gap_min"] == 12 and run["task_fields"]["num_kv_pairs"] == [2, 4]


def test_flag_none_overrides_a_config_files_value(tmp_path):
    """``--target-accuracy none`` turns off a config file's early stop (a run's run.json sets it)."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"task": "mqar", "arch": "swa", "train": {"max_steps": 2, "target_accuracy": 0.9}}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "kept"), *TINY]) == 0
    assert json.loads((tmp_path / "kept" / "run.json").read_text())["train"]["target_accuracy"] == 0.9
    assert main(["train", "--config", str(config), "--target-accuracy", "none", "--out", str(tmp_path / "off"),
                 *TINY]) == 0
    assert json.loads((tmp_path / "off" / "run.json").read_text())["train"]["target_accuracy"] is None


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "missing.json"], "does not exist"),
    (["train", "--num-kv-pairs", "500", "--train-lengths", "64"], "num_kv_pairs"),
    (["train", "--task", "mqar", "--noise-per-pair", "3"], "noise_per_pair"),
    (["eval", "--ckpt", "nowhere"], "not a bmojo checkpoint"),
    (["train", "--fsdp"], "run torchrun --nproc_per_node=N -m bmojo train ... --fsdp"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, args, message):
    result = bmojo(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_config_file_and_unknown_task(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = bmojo("train", "--config", str(bad))
    assert result.returncode == 2 and "is not valid JSON" in result.stderr and "Traceback" not in result.stderr
    result = bmojo("train", "--task", "sorting")
    assert result.returncode == 2 and "invalid choice: 'sorting'" in result.stderr


def test_eval_varies_a_setting_of_the_trained_model(tmp_path, capsys):
    far_recall = [a if a != "2,4" else "2" for a in TINY]  # 2 kv pairs: room for gaps of 12 in 24 tokens
    assert main(["train", "--task", "far_recall", "--arch", "bmojo", "--out", str(tmp_path), "--max-steps", "2",
                 "--eidetic-per-chunk", "2", "--eidetic-capacity", "8", "--chunk-size", "4", "--gap-min", "12",
                 *far_recall]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path), "--vary", "eidetic_capacity=0,8", "--json"]) == 0
    out = capsys.readouterr().out
    assert "<- as trained" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["trained"] == 8 and [r["varied"]["value"] for r in result["rows"]] == [0, 8]
    assert (tmp_path / "ablation_eidetic_capacity.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "--ckpt", str(tmp_path), "--vary", "lr=1e-3"]) == 2
    assert "--vary lr is for bmojo demo" in capsys.readouterr().err


def test_eval_of_a_triton_checkpoint_off_cuda_takes_the_pytorch_kernels(tmp_path, capsys, request):
    """A recall checkpoint whose config chose the Triton attention: off CUDA an error naming the
    flag; ``--attention-kernel torch`` or ``--set attention_kernel=torch`` evaluate it."""
    assert main(["train", "--task", "mqar", "--arch", "swa", "--out", str(tmp_path), "--max-steps", "1", *TINY]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_kernel": "triton"}))
    request.getfixturevalue("triton_without_interpreter")
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("(with --attention-kernel torch, PyTorch's ops compute the same)")
    for choice in (["--attention-kernel", "torch"], ["--set", "attention_kernel=torch"]):
        assert main(["eval", "--ckpt", str(tmp_path), *choice, "--json"]) == 0
        assert 0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] <= 1
    assert main(["eval", "--ckpt", str(tmp_path), "--set", "attention_kernel=torch",
                 "--vary", "attention_kernel=torch,triton"]) == 2  # checked before the first value runs
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == (
        "error: attention_kernel='triton': the Triton kernels run on CUDA, this run's device is cpu")


def test_eval_changes_a_field_of_the_task(tmp_path, capsys):
    """``bmojo eval --gap-min 32`` tests the model on queries at least 32 positions back; the
    other task fields stay the run's."""
    far_recall = [a if a != "2,4" else "2" for a in TINY]
    assert main(["train", "--task", "far_recall", "--arch", "swa", "--out", str(tmp_path), "--max-steps", "1",
                 "--gap-min", "12", *far_recall]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path), "--json"]) == 0
    as_trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert any(int(bucket.split("-")[0]) < 32 for bucket in as_trained["by_distance"])
    assert main(["eval", "--ckpt", str(tmp_path), "--gap-min", "32", "--json"]) == 0
    changed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(changed["by_distance"]) == {"32-63"} and set(changed["by_kv_pairs"]) == {"2"}
    result = bmojo("eval", "--ckpt", str(tmp_path), "--gap-min", "100")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "gap" in result.stderr


def test_eval_sets_model_settings_before_varying_one(tmp_path, capsys, monkeypatch):
    """``--set`` rebuilds the trained model with settings that need no new weights (here
    storage), then ``--vary`` varies another one on top of them."""
    from bmojo.evaluation import ablation

    assert main(["train", "--task", "far_recall", "--arch", "bmojo", "--out", str(tmp_path), "--max-steps", "1",
                 "--gap-min", "12", *[a if a != "2,4" else "2" for a in TINY]]) == 0
    capsys.readouterr()
    built = []
    original = ablation.with_settings

    def recording_with_settings(model, **fields):
        built.append(original(model, **fields))
        return built[-1]

    monkeypatch.setattr(ablation, "with_settings", recording_with_settings)
    assert main(["eval", "--ckpt", str(tmp_path), "--set", "storage_blocks=2", "--set", "storage_block_size=4",
                 "--vary", "storage_source=raw,evicted", "--gap-min", "40", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["varied"]["value"] for r in rows] == ["raw", "evicted"]
    evaluated = [(m.config.storage_blocks, m.config.storage_block_size, m.config.storage_source) for m in built[1:]]
    assert evaluated == [(2, 4, "raw"), (2, 4, "evicted")]
    result = bmojo("eval", "--ckpt", str(tmp_path), "--set", "storage_blocks=1,2")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "one value" in result.stderr


def test_train_under_torchrun_with_fsdp_then_resume_on_one_process(tmp_path, capsys):
    args = ["train", "--task", "mqar", "--out", str(tmp_path), "--max-steps", "4", "--precision", "fp32", *TINY]
    result = torchrun_bmojo(*args, "--fsdp")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("by kv pairs") == 1  # rank 0 alone reports
    assert result.stderr.count("training bmojo on mqar") == 1
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    assert is_sharded_checkpoint(tmp_path / "checkpoint")
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] >= 0
    model = LanguageModel.from_pretrained(tmp_path)  # the sharded model, exported whole
    assert model.config.d_model == 32
    # one process resumes the two processes' sharded checkpoint (the run is complete: nothing left to train)
    assert main([*args, "--resume"]) == 0
    assert "by kv pairs" in capsys.readouterr().out


def test_user_mistake_under_torchrun_is_an_error_of_each_rank(tmp_path):
    result = torchrun_bmojo("train", "--out", str(tmp_path), "--max-steps", "2", *TINY, "--batch-size", "3")
    assert result.returncode != 0
    assert "error: [rank 0] batch_size=3 is the global batch" in result.stderr


def test_triton_kernels_on_the_cpu_fail_before_anything_is_written(tmp_path):
    """Without Triton's interpreter (which tests/conftest.py turns on for this process), the
    kernels need CUDA: a one-line error before the output directory exists."""
    pytest.importorskip("triton")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "bmojo", "train", "--ssd-kernel", "triton", "--device", "cpu",
                             "--out", str(out), *TINY], capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and not out.exists()
    assert result.stderr.strip().splitlines()[-1] == ("error: ssd_kernel='triton': the Triton kernels run on CUDA, "
                                                     "this run's device is cpu")
