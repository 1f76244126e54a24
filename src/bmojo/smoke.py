"""The current main job: build every preset, train it a few steps on random tokens, decode.

A placeholder for the recall demo of a later issue: it proves, in seconds on a laptop CPU,
that every architecture of DESIGN.md §6 builds, learns (loss goes down on a fixed batch)
and decodes through its fixed-size cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from bmojo.config import PRESETS, ModelConfig
from bmojo.device import device_or_default
from bmojo.models.lm import LanguageModel


@dataclass
class SmokeResult:
    arch: str
    params: int
    state_bytes: int
    first_loss: float
    last_loss: float
    decode_ms_per_token: float


def smoke_config(arch: str, seq_len: int) -> ModelConfig:
    """A small model (~0.1M parameters) with memories short enough that a ``seq_len``
    sequence runs past window, fading span and eidetic capacity."""
    return ModelConfig.preset(arch, vocab_size=256, d_model=64, n_layers=2, n_heads=4, window=16,
                              eidetic_per_chunk=2, eidetic_capacity=8, d_state=16, ssm_headdim=32,
                              mlp_ratio=2.0, max_seq_len=seq_len)


def run_smoke(arch: str, steps: int, batch: int, seq_len: int, decode_tokens: int,
              device: torch.device, seed: int = 0) -> SmokeResult:
    """Train ``steps`` AdamW steps on one fixed random batch (next-token loss + the innovation
    auxiliary loss), then decode ``decode_tokens`` tokens after a prompt of ``seq_len``."""
    torch.manual_seed(seed)
    model = LanguageModel(smoke_config(arch, seq_len)).to(device)
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=3e-3)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(inputs)
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
        (loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    start = time.perf_counter()
    model.generate(inputs[:1], max_new_tokens=decode_tokens, temperature=1.0, top_k=50, seed=seed)
    elapsed = time.perf_counter() - start
    return SmokeResult(arch, model.num_params(), model.state_size_bytes(), losses[0], losses[-1],
                       1000 * elapsed / max(decode_tokens, 1))


def smoke_all(steps: int = 30, batch: int = 4, seq_len: int = 96, decode_tokens: int = 16,
              device: torch.device | None = None) -> list[SmokeResult]:
    device = device or torch.device(device_or_default(None))
    results = []
    for arch in tqdm(PRESETS, desc="presets", unit="arch"):
        results.append(run_smoke(arch, steps, batch, seq_len, decode_tokens, device))
    return results


def format_table(results: list[SmokeResult]) -> str:
    header = (f"{'arch':<12} {'params':>8} {'state bytes':>12} {'loss first':>10} {'loss last':>10} "
              f"{'decode ms/tok':>13}")
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(f"{r.arch:<12} {r.params:>8,} {r.state_bytes:>12,} {r.first_loss:>10.3f} {r.last_loss:>10.3f} "
                    f"{r.decode_ms_per_token:>13.2f}")
    return "\n".join(rows)
