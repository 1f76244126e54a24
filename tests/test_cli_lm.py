"""Language modelling end to end through the command line: data prepare -> train --task lm
-> eval --task lm -> generate (tiny models, a corpus made of this repository's docs)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bmojo import LanguageModel
from bmojo.cli import main
from bmojo.data.shards import TokenShards
from bmojo.device import KERNEL_MODULES
from bmojo.training.lm import LMRun

REPO = Path(__file__).resolve().parents[1]
TINY = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--window", "8", "--fading-span", "8",
        "--chunk-size", "8", "--eidetic-per-chunk", "2", "--eidetic-capacity", "8", "--d-state", "8",
        "--ssm-headdim", "16", "--mlp-ratio", "2", "--seq-len", "32", "--batch-size", "4", "--eval-every", "4",
        "--eval-tokens", "512", "--precision", "fp32", "--no-progress"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "data"
    assert main(["data", "prepare", "--input", str(REPO / "README.md"), str(REPO / "docs" / "*.md"), "--out", str(out),
                 "--no-progress"]) == 0
    return out


def test_train_eval_generate(data_dir, tmp_path, capsys):
    ckpts = []
    for arch in ("bmojo", "swa"):
        out = tmp_path / arch
        assert main(["train", "--task", "lm", "--data", str(data_dir), "--arch", arch, "--out", str(out),
                     "--max-steps", "8", *TINY]) == 0
        assert "validation perplexity" in capsys.readouterr().out
        run = json.loads((out / "run.json").read_text())
        assert run["task"] == "lm" and run["seq_len"] == 32 and run["model"]["d_model"] == 32
        assert (out / "tokenizer.json").is_file()  # the checkpoint carries its tokenizer
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if "eval_ppl" in m] == [4, 8]
        ckpts.append(str(out))
    argv = ["eval", "--task", "lm", "--data", str(data_dir), "--lengths", "16,64", "--max-tokens", "256", "--json"]
    for ckpt in ckpts:
        argv += ["--ckpt", ckpt]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert set(results) == set(ckpts)
    for per_length in results.values():
        assert set(per_length) == {"16", "64"}
        assert all(1 < r["ppl"] < 1e4 and r["tokens"] > 0 for r in per_length.values())
    assert (Path(ckpts[0]) / "perplexity_vs_length.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["generate", "--ckpt", ckpts[0], "--prompt", "B'MOJO", "--max-new-tokens", "12", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "--ckpt", ckpts[0], "--prompt", "B'MOJO", "--max-new-tokens", "12", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first and first.startswith("B'MOJO")  # seeded: reproducible


def test_training_windows_are_next_token_pairs(data_dir):
    shards = TokenShards(data_dir)
    window = shards.batch("train", 0, 2, 16, seed=0)
    pieces = np.lib.stride_tricks.sliding_window_view(np.asarray(shards.tokens("train"), dtype=np.int64), 17)
    for row in window:  # every window is a contiguous piece of the training stream
        assert (pieces == row.numpy()).all(axis=1).any()
    run = LMRun(data=str(data_dir), arch="transformer", seq_len=16, model={"d_model": 32, "n_layers": 1, "n_heads": 2})
    model = LanguageModel(run.model_config())
    assert model.config.vocab_size == shards.vocab_size == 257 and model.config.max_seq_len == 16
    assert torch.equal(window, shards.batch("train", 0, 2, 16, seed=0))


@pytest.mark.parametrize("argv, message", [
    (["train", "--task", "lm", "--out", "x"], "--task lm needs --data"),
    (["train", "--task", "lm", "--data", "d", "--num-kv-pairs", "4"], "num_kv_pairs: only for synthetic"),
    (["train", "--task", "mqar", "--seq-len", "64"], "seq_len: only for --task lm"),
    (["eval", "--task", "lm", "--ckpt", "x"], "--task lm needs --data DIR and --lengths"),
])
def test_user_mistakes_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_refuses_a_checkpoint_of_another_vocabulary(data_dir, tmp_path, capsys):
    assert main(["train", "--task", "mqar", "--out", str(tmp_path), "--max-steps", "1", "--d-model", "32",
                 "--n-layers", "1", "--n-heads", "2", "--vocab-size", "32", "--train-lengths", "24",
                 "--test-lengths", "24", "--eval-examples", "4", "--batch-size", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--task", "lm", "--ckpt", str(tmp_path), "--data", str(data_dir), "--lengths", "8"]) == 2
    assert "not the same tokenizer" in capsys.readouterr().err


def test_generate_with_a_disk_block_store(data_dir, tmp_path, capsys):
    out = tmp_path / "bmojo-storage"
    assert main(["train", "--task", "lm", "--data", str(data_dir), "--arch", "bmojo", "--out", str(out),
                 "--max-steps", "2", "--storage-blocks", "2", "--storage-block-size", "4", *TINY]) == 0
    capsys.readouterr()
    argv = ["generate", "--ckpt", str(out), "--prompt", "B'MOJO keeps what it has seen, " * 3,
            "--max-new-tokens", "40", "--seed", "1"]
    assert main(argv) == 0
    in_ram = capsys.readouterr().out
    store_dir = tmp_path / "store"
    assert main([*argv, "--storage", str(store_dir)]) == 0
    assert capsys.readouterr().out == in_ram  # the same decode, its blocks in memory-mapped files
    assert main([*argv, "--prefill-piece", "16"]) == 0
    assert capsys.readouterr().out == in_ram  # the prompt read in pieces: the same decode
    assert any(path.stat().st_size > 0 for path in store_dir.iterdir())
    without_storage = tmp_path / "swa-no-storage"
    assert main(["train", "--task", "lm", "--data", str(data_dir), "--arch", "swa", "--out", str(without_storage),
                 "--max-steps", "1", *TINY]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(without_storage), "--prompt", "x", "--storage", str(store_dir)]) == 2
    assert "no layer has storage" in capsys.readouterr().err


def test_a_checkpoint_of_triton_kernels_runs_off_cuda_with_the_pytorch_ones(data_dir, tmp_path, capsys, request):
    """A model trained with the Triton kernels (its config says so) off CUDA: a one-line error
    naming the flags, and with ``--attention-kernel torch --ssd-kernel torch`` the same text as
    the model computing with PyTorch's ops all along."""
    out = tmp_path / "bmojo"
    assert main(["train", "--task", "lm", "--data", str(data_dir), "--arch", "bmojo", "--out", str(out),
                 "--max-steps", "1", *TINY]) == 0
    capsys.readouterr()
    argv = ["generate", "--ckpt", str(out), "--prompt", "B'MOJO", "--max-new-tokens", "8", "--seed", "2"]
    assert main(argv) == 0
    with_pytorch = capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "attention_kernel": "triton", "ssd_kernel": "triton"}))
    request.getfixturevalue("triton_without_interpreter")
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out}: attention_kernel='triton' and ssd_kernel='triton': the Triton kernels run on CUDA, this "
        f"run's device is cpu (with --attention-kernel torch --ssd-kernel torch, PyTorch's ops compute the same)")
    assert main([*argv, "--attention-kernel", "torch", "--ssd-kernel", "torch"]) == 0
    assert capsys.readouterr().out == with_pytorch


def test_without_triton_the_error_names_the_flag_of_the_triton_kernel(data_dir, tmp_path, capsys, monkeypatch):
    """Checked before the model is built (which would import the kernels): the one flag that
    matters is named."""
    out = tmp_path / "mamba2"
    assert main(["train", "--task", "lm", "--data", str(data_dir), "--arch", "mamba2", "--out", str(out),
                 "--max-steps", "1", *TINY]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "ssd_kernel": "triton"}))
    monkeypatch.setitem(sys.modules, "triton", None)  # an import of it raises ImportError
    for name in KERNEL_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert main(["generate", "--ckpt", str(out), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {out}: ssd_kernel='triton': triton is not installed")
    assert error.endswith("(with --ssd-kernel torch, PyTorch's ops compute the same)")
    assert main(["generate", "--ckpt", str(out), "--prompt", "x", "--max-new-tokens", "2",
                 "--ssd-kernel", "torch"]) == 0
