"""Gated DeltaNet token mixer: short conv + SiLU on q, k, v; L2-normed q, k; gated delta rule; gated RMSNorm output."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .context import SequenceContext
from .projections import project
from .short_conv import cached_short_conv, is_decoding, padding_keep


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + eps).to(x.dtype)


def gate_and_beta(a: torch.Tensor, b: torch.Tensor, gate_params) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's log decay g = -exp(A_log) softplus(a + dt_bias) and write strength beta = sigmoid(b + b_bias),
    [B, T, H] fp32 each, from the raw a, b and the per-head GateParams (what the kernels form themselves when
    gdn_fused_inputs is on)."""
    A_log, dt_bias, b_bias = gate_params
    g = -torch.exp(A_log.float()) * F.softplus(a.float() + dt_bias)
    return g, torch.sigmoid(b.float() + b_bias.float())


class GatedDeltaNetMixer(nn.Module):
    """S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,  o_t = S_t^T q_t / sqrt(d_k),  out = W_o RMSNorm(o) * silu(W_g x).

    a_t = exp(-exp(A_log) * softplus(W_a x_t + dt_bias)) and b_t = sigmoid(W_b x_t + b_bias), one of each per head.
    With config.gdn_fused_inputs the kernels form a_t, b_t and the q/k norms from the raw projections themselves;
    with config.recurrent_rope, q_t and k_t are rotated by RoPE at position t first.
    b_bias holds a per-head write strength that does not depend on the input (conversion sets it from the teacher;
    zero gives GDN's own b_t = sigmoid(W_b x_t)). `heads` (default: the config's gdn_num_heads and gdn_num_k_heads)
    gives it that many heads, each with its own q and k: a head-wise layer's recurrent part.
    """

    plain_recurrence = True  # recurrence() is the delta rule on this token: a decode step may run as one launch

    def __init__(self, config, layer_idx: int, heads: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = heads or config.gdn_num_heads
        self.num_k_heads = heads or config.gdn_num_k_heads
        self.head_k_dim = config.gdn_head_k_dim
        self.head_v_dim = config.gdn_head_v_dim
        self.chunk_size = config.gdn_chunk_size
        self.fused_inputs = config.gdn_fused_inputs
        self.rope = config.recurrent_rope
        self.norm_eps = config.rms_norm_eps
        hidden = config.hidden_size
        key_dim, value_dim = self.num_k_heads * self.head_k_dim, self.num_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.a_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.b_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.g_proj = nn.Linear(hidden, value_dim, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(2 * key_dim + value_dim, config.conv_kernel_size))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.b_bias = nn.Parameter(torch.empty(self.num_heads))
        self.norm_weight = nn.Parameter(torch.empty(self.head_v_dim))
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)

    @property
    def conv_channels(self) -> tuple[int, int, int]:
        key_dim = self.num_k_heads * self.head_k_dim
        return key_dim, key_dim, self.num_heads * self.head_v_dim

    @property
    def input_groups(self) -> list[tuple[nn.Linear, ...]]:
        """The projections of the layer input, grouped as project() takes them: q|k|v (one conv), a, b, g."""
        return [(self.q_proj, self.k_proj, self.v_proj), (self.a_proj,), (self.b_proj,), (self.g_proj,)]

    @property
    def gate_params(self):
        return ops.GateParams(self.A_log, self.dt_bias, self.b_bias)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """[H, K, V] of the recurrent state."""
        return self.num_heads, self.head_k_dim, self.head_v_dim

    @torch.no_grad()
    def new_parameter_values(self) -> dict[str, torch.Tensor]:
        """Values for the parameters attention has no counterpart of (GDN's own initialization)."""
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        width = self.conv_weight.shape[1]
        return {
            "conv_weight": torch.empty_like(self.conv_weight).uniform_(-(width**-0.5), width**-0.5),
            "A_log": torch.log(torch.empty(self.num_heads).uniform_(1, 16)),
            "dt_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
            "b_bias": torch.zeros(self.num_heads),
            "norm_weight": torch.ones(self.head_v_dim),
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
        qkv, a, b, gate = projected if projected is not None else project(hidden_states, self.input_groups)
        decoding = is_decoding(layer_cache, length)
        if decoding and self.fused_inputs and self.plain_recurrence and not self.rope:  # conv, rule, norm: one launch
            o = ops.gated_delta_layer_step(
                qkv[:, 0], a[:, 0], b[:, 0], gate[:, 0], self.conv_weight, layer_cache.conv_state,
                layer_cache.recurrent_state, self.gate_params, self.norm_weight, k_heads=self.num_k_heads,
                scale=self.head_k_dim**-0.5, norm_eps=self.norm_eps)  # [B, H*V]
            return self.o_proj(o[:, None])
        qkv, conv_state = cached_short_conv(qkv, self.conv_weight, None, layer_cache, keep)  # [B, T, D_conv]
        q, k, v = torch.split(qkv, self.conv_channels, dim=-1)
        q = q.view(batch, length, self.num_k_heads, self.head_k_dim)  # [B, T, HK, K]
        k = k.view(batch, length, self.num_k_heads, self.head_k_dim)  # [B, T, HK, K]
        v = v.view(batch, length, self.num_heads, self.head_v_dim)  # [B, T, H, V]
        if self.rope:  # a rotation: the L2 norms below (or in the kernels) are the same before or after it
            q, k = context.rotate(q, k)
        if self.fused_inputs:
            g, beta = a, b  # raw: the kernels normalize q, k and form the gate and beta themselves
        else:
            q, k = l2_normalize(q), l2_normalize(k)
            g, beta = gate_and_beta(a, b, self.gate_params)  # [B, T, H] each
        o = self.recurrence(q, k, v, g, beta, layer_cache, decoding)  # [B, T, H, V]
        if conv_state is not None:
            layer_cache.conv_state = conv_state
        gate = gate.view(batch, length, self.num_heads, self.head_v_dim)
        o = ops.gated_rms_norm(o, gate, self.norm_weight, eps=self.norm_eps)
        return self.o_proj(o.reshape(batch, length, -1))

    def log_decay(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, T, H] fp32 log a_t of each head at these mixer inputs [B, T, C]."""
        return gate_and_beta(self.a_proj(hidden_states), self.b_proj(hidden_states), self.gate_params)[0]

    def recurrence(self, q, k, v, g, beta, layer_cache, decoding: bool) -> torch.Tensor:
        """o [B, T, H, V] of the gated delta rule over this forward's tokens, continuing layer_cache's state (if any)
        and leaving the new one there. With `fused_inputs`, q, k are un-normalized and g, beta are the raw a, b."""
        scale = self.head_k_dim**-0.5
        fused = {"gate_params": self.gate_params if self.fused_inputs else None,
                 "qk_l2norm": self.fused_inputs}
        if decoding:
            return ops.gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], layer_cache.recurrent_state,
                                        scale=scale, **fused)[:, None]
        o, state = ops.chunk_gated_delta_rule(
            q, k, v, g, beta, scale=scale, chunk_size=self.chunk_size,
            initial_state=layer_cache.recurrent_state if layer_cache is not None else None,
            output_final_state=layer_cache is not None, **fused,
        )  # [B, T, H, V]
        if layer_cache is not None:
            layer_cache.recurrent_state = state
        return o
