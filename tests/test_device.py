"""bmojo.device: the default device, and whether a model's Triton kernels can run on a device."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from bmojo import ModelConfig
from bmojo.device import KERNEL_MODULES, device_or_default, require_kernels_run_on, triton_unavailable


def test_default_device_is_cuda_when_available():
    assert device_or_default("cpu") == "cpu"
    assert device_or_default(None) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_pytorch_kernels_run_anywhere(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # an import of it raises ImportError
    require_kernels_run_on(ModelConfig.preset("bmojo"), "cpu")


def test_triton_kernels_off_cuda_are_a_value_error_naming_the_fields(triton_without_interpreter):
    config = ModelConfig.preset("bmojo", attention_kernel="triton", ssd_kernel="triton")
    with pytest.raises(ValueError, match="^attention_kernel='triton' and ssd_kernel='triton': the Triton kernels "
                                         "run on CUDA, this run's device is cpu$"):
        require_kernels_run_on(config, "cpu")
    require_kernels_run_on(config, "cuda")  # where they run: no error before the first step


@pytest.mark.parametrize("imported", [0, 1, 2])
def test_the_interpreter_runs_the_kernels_on_the_cpu_as_the_imported_modules_decided(imported, monkeypatch):
    """Each kernel module imported counts as it read Triton's setting at its import (its kernels
    were defined interpreted), one not imported yet as the setting is now: the CPU runs them
    when all of them are interpreted."""
    triton = pytest.importorskip("triton")
    for position, name in enumerate(KERNEL_MODULES):
        monkeypatch.delitem(sys.modules, name, raising=False)
        if position < imported:
            monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(INTERPRETED=True))
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    assert triton_unavailable("cpu") is None
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    assert (triton_unavailable("cpu") is None) == (imported == len(KERNEL_MODULES))


def test_triton_missing_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    assert triton_unavailable("cuda").startswith("triton is not installed (for the Triton kernels: `pip install")
