"""The same code on an accelerator (the performance issue's GPU section): the fast ops and every
architecture's forward, backward, decoding and training on the device, checked against the
CPU. Skipped where the device is missing.

The device is ``cuda`` unless ``BMOJO_TEST_DEVICE`` names another (``cuda:1``, or ``cpu`` to run
this file's code where no accelerator is). Not Apple's ``mps``: the ops use float64 in places
(SSD segment sums, RoPE angles, eidetic ranks), which it lacks.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from bmojo import PRESETS, LanguageModel, ModelConfig
from bmojo.cli import main as bmojo_main
from bmojo.ops import ssd_chunked, ssd_sequential, union_attention_chunked, union_attention_reference

DEVICE = torch.device(os.environ.get("BMOJO_TEST_DEVICE", "cuda"))


def _device_missing() -> str | None:
    """Why DEVICE cannot run here, or None."""
    if DEVICE.type == "cpu":
        return None
    module = getattr(torch, DEVICE.type, None)
    if module is None or not module.is_available():
        return f"no {DEVICE.type} device (BMOJO_TEST_DEVICE={DEVICE})"
    if DEVICE.index is not None and DEVICE.index >= module.device_count():
        return f"{DEVICE} is not on this machine ({module.device_count()} {DEVICE.type} devices)"
    return None


pytestmark = pytest.mark.skipif(_device_missing() is not None, reason=_device_missing() or "")

# Several chunks and past W + F + M, as tests/models/test_lm.py's tiny models.
TINY = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=4, fading_span=3,
            chunk_size=4, eidetic_per_chunk=2, eidetic_capacity=4, d_state=8, ssm_headdim=16, mlp_ratio=2.0,
            max_seq_len=8)
L = 48
CLOSE = dict(atol=2e-4, rtol=2e-3)  # float32 on two devices: reduction orders differ


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """TF32 (CUDA's default for convolutions) would turn float32 agreement into 1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_model(name: str, **overrides) -> LanguageModel:
    """A seeded tiny model whose innovation predictors are random rather than zero: at the zero
    init every score is ||x_t||²/D of a normalised input, about 1, and ties broken by the last
    bit would make the device and the CPU select different tokens."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.preset(name, **{**TINY, **overrides}))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".predictor." in param_name:
                param.normal_(0.0, 0.3)
    return model


def tokens(batch=2, length=L, seed=1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def leaves(inputs: dict, device: torch.device) -> dict:
    """Float tensors as fresh leaves that require grad on ``device``; others moved as they are."""
    return {name: None if t is None else (t.to(device).requires_grad_(True) if t.is_floating_point() else t.to(device))
            for name, t in inputs.items()}


def grads_of(out: torch.Tensor, inputs: dict, seed=2) -> dict:
    """Gradients of <out, g> for a fixed random ``g``, per float input."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    names = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    return dict(zip(names, torch.autograd.grad((out.float() * g).sum(), [inputs[n] for n in names]), strict=True))


def assert_close_on_cpu(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name].cpu(), expected[name].cpu(), **(tolerance or CLOSE), msg=name)


@pytest.mark.parametrize("length", [37, 256])
def test_chunked_ssd_on_the_device_matches_the_sequential_scan_on_the_cpu(length):
    gen = torch.Generator().manual_seed(0)
    b, h, p, g, n = 2, 4, 8, 2, 16
    inputs = dict(x=torch.randn(b, length, h, p, generator=gen),
                  dt=1e-3 + 0.1 * torch.rand(b, length, h, generator=gen),
                  A=-1.0 - 15.0 * torch.rand(h, generator=gen),
                  B=torch.randn(b, length, g, n, generator=gen), C=torch.randn(b, length, g, n, generator=gen),
                  D=torch.randn(h, generator=gen), initial_state=torch.randn(b, h, p, n, generator=gen))
    on_device, on_cpu = leaves(inputs, DEVICE), leaves(inputs, torch.device("cpu"))
    y, state = ssd_chunked(**on_device, chunk_size=16)
    y_ref, state_ref = ssd_sequential(**on_cpu)
    assert y.device.type == DEVICE.type
    assert_close_on_cpu({"y": y, "state": state}, {"y": y_ref, "state": state_ref})
    both, both_ref = torch.cat([y.flatten(), state.flatten()]), torch.cat([y_ref.flatten(), state_ref.flatten()])
    assert_close_on_cpu(grads_of(both, on_device), grads_of(both_ref, on_cpu))


@pytest.mark.parametrize("window,fading_span,capacity,length", [
    (None, 0, None, 192),  # full causal: one SDPA call
    (16, 0, None, 192),    # sliding window, short: one band-masked SDPA call
    (16, 0, None, 320),    # sliding window past DENSE_WINDOW_MAX_LEN: query blocks
    (16, 16, 8, 192),      # the B'MOJO union of raw, fading and eidetic keys: query blocks
])
def test_union_attention_on_the_device_matches_the_dense_reference_on_the_cpu(window, fading_span, capacity, length):
    """Each path of the fast attention against the dense reference, outputs and gradients."""
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, dh, chunk = 2, 4, 2, 16, 16
    inputs = dict(q=torch.randn(b, length, h, dh, generator=gen), k=torch.randn(b, length, hkv, dh, generator=gen),
                  v=torch.randn(b, length, hkv, dh, generator=gen))
    if fading_span:
        inputs.update(kf=torch.randn(b, length, hkv, dh, generator=gen),
                      vf=torch.randn(b, length, hkv, dh, generator=gen))
    if capacity:
        chunks = length // chunk
        inputs.update(mem_k=torch.randn(b, chunks, capacity, hkv, dh, generator=gen),
                      mem_v=torch.randn(b, chunks, capacity, hkv, dh, generator=gen),
                      mem_pos=torch.randint(-1, length, (b, chunks, capacity), generator=gen),
                      q_mem=torch.randn(b, length, h, dh, generator=gen))
    on_device, on_cpu = leaves(inputs, DEVICE), leaves(inputs, torch.device("cpu"))
    settings = dict(window=window, fading_span=fading_span, chunk_size=chunk)
    out = union_attention_chunked(**on_device, **settings)
    out_ref = union_attention_reference(**on_cpu, **settings)
    assert out.device.type == DEVICE.type
    assert_close_on_cpu({"out": out}, {"out": out_ref})
    assert_close_on_cpu(grads_of(out, on_device), grads_of(out_ref, on_cpu))


# Every architecture, and B'MOJO with the optional convolution over q, k, v.
MODELS = [(name, {}) for name in PRESETS] + [("bmojo", {"qkv_conv": 4})]
MODEL_IDS = [name + ("+qkv_conv" if overrides else "") for name, overrides in MODELS]


@pytest.mark.parametrize(("name", "overrides"), MODELS, ids=MODEL_IDS)
def test_every_architecture_on_the_device_matches_the_cpu_with_gradients(name, overrides):
    x = tokens()
    results = []
    for device in (torch.device("cpu"), DEVICE):
        model = tiny_model(name, **overrides).to(device)
        out = model(x.to(device))
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].to(device).flatten()) + out.aux_loss
        loss.backward()
        results.append({"logits": out.logits.detach(), "loss": loss.detach(),
                        **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}})
    cpu, accelerated = results
    assert accelerated["logits"].device.type == DEVICE.type
    assert_close_on_cpu(accelerated, cpu)


@pytest.mark.parametrize(("name", "overrides"), MODELS, ids=MODEL_IDS)
def test_prefill_and_decoding_on_the_device_equal_the_full_forward(name, overrides):
    """A prefill in two pieces (the second continues from the cache), then one token at a time."""
    model = tiny_model(name, **overrides).to(DEVICE).eval()
    x = tokens().to(DEVICE)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(x.shape[0])
        logits = [model(x[:, :13], cache).logits, model(x[:, 13:30], cache).logits]
        logits += [model(x[:, t:t + 1], cache).logits for t in range(30, L)]
    assert cache.position == L
    assert all(t.device.type == DEVICE.type for t in logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("source", ["raw", "evicted"])
def test_in_storage_memory_decodes_on_the_device_as_the_full_forward(source, tmp_path):
    """Blocks go from the device to the host store and are retrieved back (DESIGN.md §5)."""
    model = tiny_model("bmojo", layer_pattern="BF", storage_blocks=2, storage_block_size=3,
                       storage_source=source).to(DEVICE).eval()
    x = tokens().to(DEVICE)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(x.shape[0], storage_dir=tmp_path)
        logits = [model(x[:, :20], cache).logits]
        logits += [model(x[:, t:t + 1], cache).logits for t in range(20, L)]
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=0)
    mixer, layer_cache = model.blocks[0].mixer, cache.layers[0]
    assert layer_cache.store.written == mixer.stored_blocks(L // TINY["chunk_size"]) > 0
    assert (layer_cache.ret_block >= 0).any()


@pytest.mark.parametrize("name", list(PRESETS))
def test_bf16_autocast_training_on_the_device_is_finite_and_learns(name):
    model = tiny_model(name).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=1e-2)
    x = tokens(length=33).to(DEVICE)
    losses = []
    for _ in range(3):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
        (loss + out.aux_loss).backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_generate_on_the_device_is_seeded_and_stays_there():
    model = tiny_model("bmojo").to(DEVICE).eval()
    prompt = tokens(length=10).to(DEVICE)
    first = model.generate(prompt, 12, temperature=1.0, top_k=5, seed=3)
    again = model.generate(prompt, 12, temperature=1.0, top_k=5, seed=3)
    assert first.shape == (2, 22) and first.device.type == DEVICE.type
    assert torch.equal(first, again) and torch.equal(first[:, :10], prompt)


def test_greedy_generation_on_the_device_picks_the_tokens_the_cpu_picks():
    prompt = tokens(length=10)
    on_cpu = tiny_model("bmojo").eval().generate(prompt, 12, temperature=0.0)
    on_device = tiny_model("bmojo").to(DEVICE).eval().generate(prompt.to(DEVICE), 12, temperature=0.0)
    assert torch.equal(on_device.cpu(), on_cpu)


def test_train_command_on_the_device_writes_a_checkpoint_that_loads_on_the_cpu(tmp_path, capsys):
    code = bmojo_main(["train", "--task", "mqar", "--arch", "bmojo", "--d-model", "32", "--n-layers", "2",
                       "--vocab-size", "32", "--num-kv-pairs", "2", "--train-lengths", "32", "--test-lengths", "48",
                       "--max-steps", "3", "--batch-size", "4", "--eval-every", "2", "--eval-examples", "8",
                       "--device", str(DEVICE), "--out", str(tmp_path), "--no-progress"])
    capsys.readouterr()
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(record["step"] for record in records) == 3
    [precision] = [record for record in records if record.get("event") == "precision"]
    assert ("GPU" in precision["reason"]) == (DEVICE.type == "cuda")
    model = LanguageModel.from_pretrained(tmp_path / "checkpoint", device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    assert bmojo_main(["inspect", "--ckpt", str(tmp_path), "--device", str(DEVICE),  # the final model and its run.json
                       "--png", str(tmp_path / "memory.png")]) == 0
    assert "slots filled" in capsys.readouterr().out


@pytest.mark.skipif(DEVICE.type not in ("cpu", "cuda"), reason="bmojo bench measures cpu and cuda devices")
@pytest.mark.parametrize("command", ["train", "decode"])
def test_bench_runs_on_the_device(command, tmp_path, capsys):
    code = bmojo_main(["bench", command, "--quick", "--json", "--no-progress", "--device", str(DEVICE),
                       "--plot-dir", str(tmp_path)])
    doc = json.loads(capsys.readouterr().out.rstrip("\n").splitlines()[-1])
    assert code == 0 and doc["results"]
    assert (doc["device"] == "cpu") == (DEVICE.type == "cpu")
