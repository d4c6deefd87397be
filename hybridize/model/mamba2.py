"""Mamba2 token mixer: short conv on [x, B, C], scalar-decay SSD recurrence, D skip, gated RMSNorm, out projection."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .context import SequenceContext
from .projections import project
from .short_conv import cached_short_conv, is_decoding, padding_keep


class Mamba2Mixer(nn.Module):
    """S_t = a_t S_{t-1} + B_t (x_t dt_t)^T,  y_t = scale * S_t^T C_t + D x_t,  out = W_out RMSNorm(y) * silu(z).

    Projections are separate modules named after what they make (z, x, B, C, dt), so conversion from
    attention reads as `C <- W_q, B <- W_k, x <- W_v, out <- W_o`; with config.recurrent_rope, C_t and B_t are
    rotated by RoPE at position t, as attention rotates q and k. `heads` (default: the config's mamba_num_heads
    and mamba_num_groups) gives it that many heads, each with its own B and C: a head-wise layer's recurrent part.
    """

    plain_recurrence = True  # recurrence() is the SSD on this token: a decode step may run as one launch

    def __init__(self, config, layer_idx: int, heads: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = heads or config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.state_size = config.mamba_state_size
        self.num_groups = heads or config.mamba_num_groups
        self.chunk_size = config.mamba_chunk_size
        self.norm_eps = config.rms_norm_eps
        self.rope = config.recurrent_rope
        hidden, inner, bc = config.hidden_size, self.num_heads * self.head_dim, self.num_groups * self.state_size
        self.z_proj = nn.Linear(hidden, inner, bias=False)
        self.x_proj = nn.Linear(hidden, inner, bias=False)
        self.B_proj = nn.Linear(hidden, bc, bias=False)
        self.C_proj = nn.Linear(hidden, bc, bias=False)
        self.dt_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(inner + 2 * bc, config.conv_kernel_size))
        self.conv_bias = nn.Parameter(torch.empty(inner + 2 * bc))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm_weight = nn.Parameter(torch.empty(self.head_dim))
        self.out_proj = nn.Linear(inner, hidden, bias=False)

    @property
    def input_groups(self) -> list[tuple[nn.Linear, ...]]:
        """The projections of the layer input, grouped as project() takes them: x|B|C (one conv), dt, z."""
        return [(self.x_proj, self.B_proj, self.C_proj), (self.dt_proj,), (self.z_proj,)]

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """[H, N, P] of the recurrent state."""
        return self.num_heads, self.state_size, self.head_dim

    @property
    def conv_channels(self) -> tuple[int, int, int]:
        inner, bc = self.num_heads * self.head_dim, self.num_groups * self.state_size
        return inner, bc, bc

    @torch.no_grad()
    def new_parameter_values(self) -> dict[str, torch.Tensor]:
        """Values for the parameters attention has no counterpart of (Mamba2's own initialization)."""
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        return {
            "conv_weight": torch.empty_like(self.conv_weight).uniform_(-0.5, 0.5),
            "conv_bias": torch.zeros_like(self.conv_bias),
            "A_log": torch.log(torch.empty(self.num_heads).uniform_(1, 16)),
            "dt_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
            "D": torch.ones(self.num_heads),
            "norm_weight": torch.ones(self.head_dim),
        }

    def forward(self, hidden_states: torch.Tensor, context: SequenceContext, layer_cache=None,
                projected=None) -> torch.Tensor:
        """hidden_states [B, T, C] -> [B, T, C]; layer_cache is a RecurrentLayerCache; projected: the outputs of
        project(hidden_states, self.input_groups) when the caller computed them (the static decoder, with no
        padding)."""
        batch, length, _ = hidden_states.shape
        keep = padding_keep(hidden_states, context)  # [B, T, 1] or None
        if keep is not None:
            # Zeroed inputs at left-padding positions leave the state at zero until the first real token.
            hidden_states = hidden_states * keep
        xbc, dt, z = projected if projected is not None else project(hidden_states, self.input_groups)
        decoding = is_decoding(layer_cache, length)
        if decoding and self.plain_recurrence and not self.rope:  # conv, SSD, skip and norm: one launch
            y = ops.ssd_layer_step(
                xbc[:, 0], dt[:, 0], z[:, 0], self.conv_weight, self.conv_bias, layer_cache.conv_state,
                layer_cache.recurrent_state, self.A_log, self.dt_bias, self.D, self.norm_weight,
                groups=self.num_groups, scale=self.state_size**-0.5, norm_eps=self.norm_eps)  # [B, H*P]
            return self.out_proj(y[:, None])
        xbc, conv_state = cached_short_conv(xbc, self.conv_weight, self.conv_bias, layer_cache, keep)  # [B, T, D_conv]
        x, b, c = torch.split(xbc, self.conv_channels, dim=-1)
        x = x.view(batch, length, self.num_heads, self.head_dim)  # [B, T, H, P]
        b = b.view(batch, length, self.num_groups, self.state_size)  # [B, T, G, N]
        c = c.view(batch, length, self.num_groups, self.state_size)  # [B, T, G, N]
        if self.rope:
            c, b = context.rotate(c, b)
        dt, g = self.steps_and_log_decay(dt)  # [B, T, H] each
        v = x * dt[..., None].to(x.dtype)
        y = self.recurrence(c, b, v, g, layer_cache, decoding)  # [B, T, H, P]
        if conv_state is not None:
            layer_cache.conv_state = conv_state
        y = y + self.D[:, None].to(y.dtype) * x
        z = z.view(batch, length, self.num_heads, self.head_dim)
        y = ops.gated_rms_norm(y, z, self.norm_weight, eps=self.norm_eps)
        return self.out_proj(y.reshape(batch, length, -1))

    def steps_and_log_decay(self, dt_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dt, log decay g = -exp(A_log) dt), [B, T, H] fp32 each, from the raw dt projection [B, T, H]."""
        dt = F.softplus(dt_raw.float() + self.dt_bias)
        return dt, -torch.exp(self.A_log.float()) * dt

    def log_decay(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, T, H] fp32 log a_t of each head at these mixer inputs [B, T, C]."""
        return self.steps_and_log_decay(self.dt_proj(hidden_states))[1]

    def recurrence(self, c, b, v, g, layer_cache, decoding: bool) -> torch.Tensor:
        """y [B, T, H, P] of the SSD recurrence over this forward's tokens (before the D skip), continuing
        layer_cache's state (if any) and leaving the new one there."""
        scale = self.state_size**-0.5
        if decoding:
            return ops.ssd_step(c[:, 0], b[:, 0], v[:, 0], g[:, 0], layer_cache.recurrent_state, scale=scale)[:, None]
        y, state = ops.chunk_ssd(
            c, b, v, g, scale=scale, chunk_size=self.chunk_size,
            initial_state=layer_cache.recurrent_state if layer_cache is not None else None,
            output_final_state=layer_cache is not None,
        )  # [B, T, H, P]
        if layer_cache is not None:
            layer_cache.recurrent_state = state
        return y
