"""The Mamba-2 mixer: the fading memory of B'MOJO (DESIGN.md §3.1) and the `S` layer.

Parameters follow the reference Mamba-2 block exactly (``in_proj`` with output order
``z, xBC, dt``; depthwise causal ``conv1d`` with bias over ``xBC``; ``dt_bias``, ``A_log``,
``D`` per head; gated RMSNorm ``norm.weight [d_inner]``; ``out_proj``), so a state dict
saved from a reference block of the same sizes loads with ``strict=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmojo.layers.norm import GatedRMSNorm
from bmojo.ops.conv import causal_depthwise_conv1d
from bmojo.ops.ssd import SSD_CHUNK_SIZE, SSD_KERNELS, chunk_scan_for, ssd_chunked, ssd_step


@dataclass
class Mamba2Cache:
    """Decoding state of one Mamba-2 mixer (DESIGN.md §7), fixed size."""

    conv_state: Tensor  # [B, conv_dim, d_conv - 1]: the last pre-convolution xBC inputs
    ssm_state: Tensor  # [B, nheads, headdim, d_state], float32


class Mamba2Mixer(nn.Module):
    """``[B, L, d_model] -> [B, L, d_model]``; ``chunk_size`` is the SSD chunk (not a weight;
    default :data:`bmojo.ops.ssd.SSD_CHUNK_SIZE`), ``ssd_kernel`` the scan's implementation in
    the parallel form (``"torch"``, or ``"triton"``: CUDA kernels, :mod:`bmojo.ops.ssd_triton`).
    ``conv1d`` holds the convolution's parameters in the reference layout; the forward pass
    applies them with :func:`bmojo.ops.causal_depthwise_conv1d`."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        bias: bool = False,
        conv_bias: bool = True,
        ssd_kernel: str = "torch",
    ):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        if self.d_inner % headdim != 0:
            raise ValueError(f"expand * d_model = {self.d_inner} must be a multiple of headdim {headdim}")
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups != 0:
            raise ValueError(f"number of SSM heads {self.nheads} must be a multiple of ngroups {ngroups}")
        self.ngroups = ngroups
        self.chunk_size = SSD_CHUNK_SIZE if chunk_size is None else chunk_size
        if ssd_kernel not in SSD_KERNELS:
            raise ValueError(f"ssd_kernel={ssd_kernel!r} is invalid: must be one of {SSD_KERNELS}")
        try:
            chunk_scan_for(ssd_kernel)  # a ValueError now if triton is missing, not at the first step
        except ValueError as err:
            raise ValueError(f"ssd_kernel={ssd_kernel!r}: {err}") from None
        self.ssd_kernel = ssd_kernel
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias)
        # dt initialised log-uniform in [dt_min, dt_max] through softplus(dt_bias).
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, n_groups=ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _ssm_inputs(self, xBC: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Post-convolution ``xBC [..., conv_dim]`` and raw ``dt [..., nheads]`` -> x, dt, A, B, C."""
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
        x = x.unflatten(-1, (self.nheads, self.headdim))
        B = B.unflatten(-1, (self.ngroups, self.d_state))
        C = C.unflatten(-1, (self.ngroups, self.d_state))
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        return x, dt, A, B, C

    def forward(self, u: Tensor, cache: Mamba2Cache | None = None, start: int = 0) -> Tensor:
        """Parallel form over ``u [B, L, d_model]``. With a ``cache``: from ``start = 0`` it is
        filled (prefill); from ``start > 0`` the sequence continues from its state (the
        convolution from its last inputs, the SSD from its state), which is then updated."""
        z, xBC, dt = self._split(self.in_proj(u))
        continues = cache is not None and start > 0
        if cache is not None:
            past = (cache.conv_state.transpose(1, 2).to(xBC.dtype) if continues
                    else xBC.new_zeros(xBC.shape[0], self.d_conv - 1, self.conv_dim))  # [B, d_conv-1, conv_dim]
            extended = torch.cat([past, xBC], 1)  # [B, d_conv-1+L, conv_dim]
            cache.conv_state.copy_(extended[:, extended.shape[1] - (self.d_conv - 1):].transpose(1, 2).detach())
            xBC = causal_depthwise_conv1d(extended, self.conv1d.weight, self.conv1d.bias)[:, self.d_conv - 1:]
        else:
            xBC = causal_depthwise_conv1d(xBC, self.conv1d.weight, self.conv1d.bias)
        x, dt, A, B, C = self._ssm_inputs(F.silu(xBC), dt)
        initial_state = cache.ssm_state if continues else None
        y, final_state = ssd_chunked(x, dt, A, B, C, self.D, initial_state=initial_state, chunk_size=self.chunk_size,
                                     kernel=self.ssd_kernel)
        if cache is not None:
            cache.ssm_state.copy_(final_state.detach())
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y)

    def step(self, u: Tensor, cache: Mamba2Cache) -> Tensor:
        """One token ``u [B, d_model]`` -> ``[B, d_model]``, updating ``cache`` in place."""
        z, xBC, dt = self._split(self.in_proj(u))
        window = torch.cat([cache.conv_state, xBC[..., None].to(cache.conv_state.dtype)], -1)  # [B, conv_dim, d_conv]
        cache.conv_state.copy_(window[..., 1:].detach())
        xBC = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        xBC = F.silu(xBC).to(z.dtype)
        x, dt, A, B, C = self._ssm_inputs(xBC, dt)
        y, new_state = ssd_step(x, dt, A, B, C, cache.ssm_state, self.D)
        cache.ssm_state.copy_(new_state.detach())
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y)

    def new_cache(self, batch_size: int, device=None, dtype=None) -> Mamba2Cache:
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        return Mamba2Cache(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                  dtype=torch.float32),
        )
