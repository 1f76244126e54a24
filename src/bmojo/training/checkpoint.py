"""Training checkpoints that survive a kill at any moment.

A checkpoint is a directory: the model (``config.json`` + ``model.safetensors``, loadable by
:meth:`bmojo.LanguageModel.from_pretrained`), ``optimizer.pt`` and ``trainer_state.json``.
It is written to a temporary sibling and swapped in with renames, so at every instant
either the directory or its ``.old`` sibling holds a complete checkpoint;
:func:`find_checkpoint` picks whichever exists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from bmojo.models.lm import LanguageModel

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{suffix}")


def save_checkpoint(path: str | Path, model: LanguageModel, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Write model, optimizer and JSON-serialisable trainer ``state`` to ``path`` atomically."""
    path = Path(path)
    tmp, old = _sibling(path, "tmp"), _sibling(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint at ``path`` (or its ``.old`` sibling after an interrupted
    swap), or ``None`` if there is none."""
    path = Path(path)
    for candidate in (path, _sibling(path, "old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_checkpoint(path: str | Path, model: LanguageModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore ``model`` and ``optimizer`` in place; return the trainer state."""
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no training checkpoint at {path}")
    saved = LanguageModel.from_pretrained(found, device=next(model.parameters()).device)
    if saved.config != model.config:
        raise ValueError(f"checkpoint {found} holds a different model config than the one being trained")
    model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(torch.load(found / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    return json.loads((found / STATE_FILE).read_text())
