"""What did the model choose to remember? The eidetic memory of every B'MOJO layer at the end
of one example, with the tokens' roles and selection scores (`bmojo inspect`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bmojo.data.synthetic import IGNORE_INDEX, RecallBatch
from bmojo.layers.bmojo import BMojoMixer
from bmojo.models.lm import LanguageModel


@dataclass
class MemoryInspection:
    tokens: list[int]  # the example
    roles: list[str]  # per position: key, value, query or other
    layers: list[int]  # indices of the layers with eidetic memory
    scores: list[list[float]]  # per such layer, the selection score of every position
    memory: list[list[tuple[int, float]]]  # per such layer, (position, score) of each filled slot

    def format(self) -> str:
        lines = []
        for layer, slots in zip(self.layers, self.memory, strict=True):
            held = sorted(slots)
            roles = {role: sum(self.roles[p] == role for p, _ in held) for role in ("key", "value", "query", "other")}
            lines.append(f"layer {layer}: {len(held)} slots filled ({', '.join(f'{n} {r}' for r, n in roles.items())})")
            lines.append(f"  {'pos':>5} {'token':>6} {'role':<6} {'score':>8}")
            for pos, score in held:
                lines.append(f"  {pos:>5} {self.tokens[pos]:>6} {self.roles[pos]:<6} {score:>8.4f}")
        return "\n".join(lines)


def token_roles(example: RecallBatch) -> list[str]:
    """Roles in a recall example: the key of each answered query, the value after it, the
    queries (labelled positions) and everything else."""
    length = example.inputs.shape[-1]
    roles = ["other"] * length
    labelled = (example.labels[0] != IGNORE_INDEX).nonzero().flatten().tolist()
    keys = example.key_positions[0][labelled].tolist() if example.key_positions is not None else []
    for key in keys:
        roles[key] = "key"
        if key + 1 < length:
            roles[key + 1] = "value"
    for pos in labelled:
        roles[pos] = "query"
    return roles


@torch.no_grad()
def inspect_memory(model: LanguageModel, example: RecallBatch) -> MemoryInspection:
    """Prefill ``example`` (batch of one) and read every B'MOJO layer's memory at the end."""
    if len(example) != 1:
        raise ValueError(f"inspect one example at a time, got a batch of {len(example)}")
    layers = [i for i, block in enumerate(model.blocks)
              if isinstance(block.mixer, BMojoMixer) and block.mixer.has_memory]
    if not layers:
        raise ValueError(f"{model.config.arch} has no eidetic memory to inspect (layer pattern "
                         f"{model.config.layer_pattern!r}); use a bmojo model")
    mixer_inputs: dict[int, torch.Tensor] = {}
    # the mixer's input is the output of its block's pre-norm
    hooks = [model.blocks[i].mixer_norm.register_forward_hook(
        lambda module, args, output, i=i: mixer_inputs.__setitem__(i, output)) for i in layers]
    try:
        model.eval()
        device = next(model.parameters()).device
        cache = model.new_cache(1)
        model(example.inputs.to(device), cache)
    finally:
        for hook in hooks:
            hook.remove()
    scores, memory = [], []
    for i in layers:
        scores.append(model.blocks[i].mixer.token_scores(mixer_inputs[i])[0].tolist())
        layer_cache = cache.layers[i]
        memory.append([(int(p), float(s)) for p, s in zip(layer_cache.mem_pos[0].tolist(),
                                                          layer_cache.mem_score[0].tolist(), strict=True) if p >= 0])
    return MemoryInspection(example.inputs[0].tolist(), token_roles(example), layers, scores, memory)


def plot_memory(inspection: MemoryInspection, path: str | Path) -> None:
    """Heat map of selection scores (layers × positions), memory slots circled, roles marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    length = len(inspection.tokens)
    fig, ax = plt.subplots(figsize=(max(6, length / 8), 1.2 + 0.6 * len(inspection.layers)))
    image = ax.imshow(inspection.scores, aspect="auto", cmap="viridis", interpolation="nearest")
    for row, slots in enumerate(inspection.memory):
        ax.scatter([p for p, _ in slots], [row] * len(slots), s=60, facecolors="none", edgecolors="red",
                   label="held in memory" if row == 0 else None)
    colours = {"key": "tab:orange", "value": "tab:green", "query": "tab:purple"}
    for role, colour in colours.items():
        xs = [p for p, r in enumerate(inspection.roles) if r == role]
        ax.scatter(xs, [-0.75] * len(xs), marker="s", s=12, color=colour, label=role, clip_on=False)
    ax.set_yticks(range(len(inspection.layers)), [f"layer {i}" for i in inspection.layers])
    ax.set_ylim(len(inspection.layers) - 0.5, -1.0)
    ax.set_xlabel("position")
    fig.colorbar(image, ax=ax, label="selection score")
    ax.legend(loc="upper left", bbox_to_anchor=(1.15, 1.0), fontsize=8)
    ax.set_title("Eidetic memory at the end of the sequence")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
