"""Modules: the mixers of DESIGN.md §6 and their building blocks."""

from bmojo.layers.attention import Attention
from bmojo.layers.bmojo import BMojoCache, BMojoMixer
from bmojo.layers.kv_buffer import KVBuffer
from bmojo.layers.mamba2 import Mamba2Cache, Mamba2Mixer
from bmojo.layers.mlp import SwiGLU
from bmojo.layers.norm import GatedRMSNorm, RMSNorm

__all__ = [
    "Attention",
    "BMojoCache",
    "BMojoMixer",
    "GatedRMSNorm",
    "KVBuffer",
    "Mamba2Cache",
    "Mamba2Mixer",
    "RMSNorm",
    "SwiGLU",
]
