"""bmojo.device: the default device, and whether a model's Triton kernels can run on a device."""

from __future__ import annotations

import sys

import pytest
import torch

from bmojo import ModelConfig
from bmojo.device import device_or_default, require_kernels_run_on, triton_unavailable


def test_default_device_is_cuda_when_available():
    assert device_or_default("cpu") == "cpu"
    assert device_or_default(None) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_pytorch_kernels_run_anywhere(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # an import of it raises ImportError
    require_kernels_run_on(ModelConfig.preset("bmojo"), "cpu")


def test_triton_kernels_off_cuda_are_a_value_error_naming_the_fields(monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    config = ModelConfig.preset("bmojo", attention_kernel="triton", ssd_kernel="triton")
    with pytest.raises(ValueError, match="^attention_kernel='triton' and ssd_kernel='triton': the Triton kernels "
                                         "run on CUDA, this run's device is cpu$"):
        require_kernels_run_on(config, "cpu")
    require_kernels_run_on(config, "cuda")  # where they run: no error before the first step
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    assert triton_unavailable("cpu") is None  # the interpreter runs them on the CPU, as in the tests


def test_triton_missing_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    assert "triton is not installed" in triton_unavailable("cuda")
