"""Training checkpoints that survive a kill at any moment, in one of two layouts.

Single-file (one process, or DDP, written by rank 0): the model (``config.json`` +
``model.safetensors``, loadable by :meth:`bmojo.LanguageModel.from_pretrained`),
``optimizer.pt`` and ``trainer_state.json``.

Sharded (FSDP2, written by every process at once with ``torch.distributed.checkpoint``):
DCP's ``.metadata`` and one ``__RANK_0.distcp`` file per process, holding the model and the
optimizer state under their parameter names, plus ``config.json`` and ``trainer_state.json``
from rank 0. DCP stores each tensor with its global shape, so the checkpoint loads into any
number of processes, sharded or not (a single process reads it without a process group).

Either is written to a temporary sibling and swapped in with renames, ``trainer_state.json``
last, so at every instant either the directory or its ``.old`` sibling holds a complete
checkpoint; :func:`find_checkpoint` picks whichever exists. :func:`load_checkpoint` restores
either layout into a plain, DDP or FSDP2 model.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bmojo.config import ModelConfig
from bmojo.models.lm import CONFIG_FILE, LanguageModel
from bmojo.training.distributed import Distributed

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
SHARDED_METADATA_FILE = ".metadata"  # written by torch.distributed.checkpoint


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{suffix}")


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the complete checkpoint ``tmp``: a complete one exists at every instant."""
    old = _sibling(path, "old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _is_sharded_model(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by FSDP2 (which older PyTorch versions do not have)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def save_checkpoint(path: str | Path, model: LanguageModel, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Write model, optimizer and JSON-serialisable trainer ``state`` to ``path`` atomically
    (the single-file layout; one process writes it)."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    _swap_in(tmp, path)


def save_sharded_checkpoint(path: str | Path, model: LanguageModel, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any], distributed: Distributed) -> None:
    """Write the FSDP2 ``model``'s and ``optimizer``'s shards from every process with
    ``torch.distributed.checkpoint``, then rank 0's config and trainer ``state``, atomically.
    Every process must call it; the checkpoint directory must be on a file system they share."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = _sibling(path, "tmp")
    if distributed.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()  # nobody writes into tmp before it is empty
    model_state, optimizer_state = get_state_dict(model, optimizer)  # this process's shards, by parameter name
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    distributed.barrier()  # every shard and DCP's metadata are written
    if distributed.is_main:
        (tmp / CONFIG_FILE).write_text(model.config.to_json())
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _swap_in(tmp, path)
    distributed.barrier()  # nobody reads or rewrites the checkpoint before the swap is done


def find_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint at ``path`` (or its ``.old`` sibling after an interrupted
    swap), or ``None`` if there is none."""
    path = Path(path)
    for candidate in (path, _sibling(path, "old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether the checkpoint directory ``path`` has the sharded (DCP) layout."""
    return (Path(path) / SHARDED_METADATA_FILE).is_file()


def _check_config(found: Path, model: LanguageModel) -> None:
    saved = ModelConfig.from_json((found / CONFIG_FILE).read_text())
    if saved != model.config:
        raise ValueError(f"checkpoint {found} holds a different model config than the one being trained")


def load_checkpoint(path: str | Path, model: LanguageModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore ``model`` (plain, the module inside DDP, or FSDP2-sharded) and
    ``optimizer`` in place from a checkpoint of either layout; return the trainer state.
    With a process group every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no training checkpoint at {path}")
    _check_config(found, model)
    if is_sharded_checkpoint(found):
        import torch.distributed.checkpoint as dcp

        # DCP fills the tensors of this template (this process's shards, or whole tensors) in place
        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        single_process = not torch.distributed.is_initialized()
        with warnings.catch_warnings():  # DCP warns that a process without a process group loads alone: intended
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(loaded, checkpoint_id=found, no_dist=single_process)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    elif _is_sharded_model(model):
        # a single-file checkpoint into an FSDP2 model: read it whole into a plain copy, then let
        # set_state_dict cut this process's shards out of the named full state
        with torch.random.fork_rng(devices=[]):  # building the copy draws initial weights
            whole = LanguageModel.from_pretrained(found)
        whole_optimizer = torch.optim.AdamW(whole.optimizer_param_groups(0.0))  # groups shaped like the trainer's
        whole_optimizer.load_state_dict(torch.load(found / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        model_state, optimizer_state = get_state_dict(whole, whole_optimizer)
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))
    else:
        saved = LanguageModel.from_pretrained(found, device=next(model.parameters()).device)
        model.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(torch.load(found / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    return json.loads((found / STATE_FILE).read_text())


def export_pretrained(model: LanguageModel, directory: str | Path, distributed: Distributed) -> None:
    """Write ``model`` as ``config.json`` + ``model.safetensors`` (:meth:`LanguageModel.save_pretrained`)
    from rank 0. An FSDP2 model is first gathered whole onto rank 0's CPU (every process must call)."""
    if _is_sharded_model(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if distributed.is_main:
            with torch.random.fork_rng(devices=[]):  # building the copy draws initial weights
                whole = LanguageModel(model.config)
            whole.load_state_dict(full_state)
            whole.save_pretrained(directory)
    elif distributed.is_main:
        model.save_pretrained(directory)
