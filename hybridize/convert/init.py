"""Initializers: one pure function per mapping from a teacher attention layer to a hybrid mixer.

Each takes the teacher layer's attention tensors {"q_proj", "k_proj", "v_proj", "o_proj"} (weights, [out, in]),
the HybridConfig, the InitOptions, for the teacher-calibrated options the layer's HeadStatistics
(convert/statistics.py), and the layer's index (a head-wise layer's head split is in the config by layer), and
returns the mixer's full state dict. Parameters attention has
no counterpart for are set by the options; docs/conversion.md records how each choice was measured.
"""

import math
from dataclasses import dataclass, replace

import torch

from ..errors import UserError
from ..model.configuration_hybrid import headwise_split

ATTENTION_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class InitOptions:
    """conv: "identity" makes the short conv pass x_t through (then SiLU); "random" is the mixer's own init.
    gate: "zero" makes silu(gate) = 0, so a converted layer starts as an exact skip and the model equals the
    teacher with that attention layer removed; "random" is a small random projection; "teacher" copies W_v into
    the gate and fits a per-head output scale to the teacher's attention output (convert/calibrate.py).
    decay: "slow" starts every head near a_t = exp(-0.01) (memory of ~100 tokens); "random" spreads heads
    over Mamba2's usual range (A in [1, 16], dt in [0.001, 0.1]); "teacher" gives each head a half-life equal
    to the teacher head's mean attention distance.
    beta (Gated DeltaNet only): "half" writes with b_t = 1/2 everywhere; "teacher" sets each head's write strength
    from its attention entropy, between BETA_RANGE's ends (sharp heads write hard, averaging heads softly).
    align_steps: Adam steps of each converted Mamba2 / GDN mixer alone against the teacher's attention output
    on the calibration text (0: none).
    long_memory_heads: with decay "teacher", the share of each layer's heads (those with the longest mean attention
    distance; at least one when the share is above 0) whose half-life is LONG_MEMORY_HALF_LIFE tokens instead, so
    that the layer keeps what a mean-distance half-life forgets within a few hundred tokens (docs/results.md).
    """

    conv: str = "identity"
    gate: str = "zero"
    decay: str = "slow"
    beta: str = "half"
    align_steps: int = 0
    long_memory_heads: float = 0.0

    def __post_init__(self):
        for field, allowed in (("conv", ("identity", "random")), ("gate", ("zero", "random", "teacher")),
                               ("decay", ("slow", "random", "teacher")), ("beta", ("half", "teacher"))):
            if getattr(self, field) not in allowed:
                raise UserError(f"init option {field}={getattr(self, field)!r}; allowed: {', '.join(allowed)}")
        if self.align_steps < 0:
            raise UserError(f"init option align_steps={self.align_steps}; must be >= 0")
        if not 0.0 <= self.long_memory_heads <= 1.0:
            raise UserError(f"init option long_memory_heads={self.long_memory_heads}; must be in [0, 1]")
        if self.long_memory_heads and self.decay != "teacher":
            raise UserError("init option long_memory_heads applies to decay='teacher' (--init-decay teacher)")

    @property
    def uses_teacher(self) -> bool:
        """Whether the init reads the teacher's attention on calibration text (statistics, fitting or alignment)."""
        return "teacher" in (self.gate, self.decay, self.beta) or self.align_steps > 0


# Every option read from the teacher's attention on calibration text (docs/conversion.md, "Init options").
TEACHER_CALIBRATED = InitOptions(gate="teacher", decay="teacher", beta="teacher")

# Write strengths of the sharpest (entropy 0) and the most uniform (entropy 1) teacher heads.
BETA_RANGE = (0.7, 0.3)
# A head whose attention stays on the current token gets half-life one token (a = 1/2), not a zero-memory state.
MIN_HALF_LIFE = 1.0
# The half-life of long-memory heads: a number written 4K tokens back keeps half its trace, one 8K back (SmolLM2's
# whole context) a quarter.
LONG_MEMORY_HALF_LIFE = 4096.0


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def decay_from_distance(mean_distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_log, dt_bias) [H] whose per-token decay a = exp(-softplus(dt_bias)) halves the state in `mean_distance`
    tokens: a^d = 1/2 <=> softplus(dt_bias) = ln 2 / d, with A_log = 0 (A = 1)."""
    dt = math.log(2) / mean_distance.float().clamp_min(MIN_HALF_LIFE)
    return torch.zeros_like(dt), inverse_softplus(dt)


def with_long_memory(mean_distance: torch.Tensor, share: float) -> torch.Tensor:
    """The half-lives [H]: each head's mean distance, except the ceil(share * H) heads with the longest, which get
    LONG_MEMORY_HALF_LIFE (ties broken by head index, so the choice is deterministic)."""
    count = math.ceil(share * mean_distance.numel() - 1e-9)  # 0.1 * 30 is 3.0000000000000004 in floats
    if count == 0:
        return mean_distance
    order = sorted(range(mean_distance.numel()), key=lambda h: (-float(mean_distance[h]), h))
    half_lives = mean_distance.clone()
    half_lives[order[:count]] = LONG_MEMORY_HALF_LIFE
    return half_lives


def beta_bias_from_entropy(entropy: torch.Tensor) -> torch.Tensor:
    """b_bias [H] with sigmoid(b_bias) = beta, linear in the normalized entropy from BETA_RANGE[0] to [1]."""
    sharp, uniform = BETA_RANGE
    return torch.logit(sharp + (uniform - sharp) * entropy.float().clamp(0, 1))


def repeat_heads(weight: torch.Tensor, num_heads: int, head_dim: int, times: int) -> torch.Tensor:
    """[num_heads * head_dim, C] -> [num_heads * times * head_dim, C], each head repeated `times` (GQA expansion)."""
    return weight.view(num_heads, head_dim, -1).repeat_interleave(times, dim=0).reshape(-1, weight.shape[-1])


def _conv_weight(channels: int, width: int, options: InitOptions, generator: torch.Generator) -> torch.Tensor:
    if options.conv == "identity":
        weight = torch.zeros(channels, width)
        weight[:, -1] = 1.0  # the newest input only
        return weight
    bound = width**-0.5
    return torch.rand(channels, width, generator=generator) * 2 * bound - bound


def _decay(num_heads: int, options: InitOptions, generator: torch.Generator,
           statistics) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_log, dt_bias) with a = exp(-exp(A_log) * softplus(dt_bias)) when the dt/alpha projection is zero."""
    if options.decay == "teacher":
        return decay_from_distance(with_long_memory(_needed(statistics).mean_distance, options.long_memory_heads))
    if options.decay == "slow":
        dt = torch.full((num_heads,), 0.01)
        a = torch.ones(num_heads)
    else:
        dt = torch.exp(torch.rand(num_heads, generator=generator) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        a = torch.rand(num_heads, generator=generator) * 15 + 1
    return torch.log(a), inverse_softplus(dt)


def _needed(statistics):
    if statistics is None:
        raise ValueError("teacher-calibrated init options need the teacher's HeadStatistics for this layer")
    return statistics


def _gate(rows: int, columns: int, options: InitOptions, std: float, generator: torch.Generator,
          value_weight: torch.Tensor) -> torch.Tensor:
    if options.gate == "teacher":
        # silu(W_v x) opens each channel where the current token's value is large; calibrate.py then scales
        # each head's output to the teacher's attention output.
        return value_weight.clone()
    if options.gate == "zero":
        return torch.zeros(rows, columns)
    return torch.randn(rows, columns, generator=generator) * std


def _check_heads(config, mixer: str, heads: int, groups: int, dims: tuple[int, ...]) -> None:
    want = (config.num_attention_heads, config.num_attention_heads) + (config.head_dim,) * len(dims)
    if (heads, groups) + dims != want:
        raise UserError(
            f"{mixer} init from attention needs heads = groups = {config.num_attention_heads} and head/state dims = "
            f"{config.head_dim} (the teacher's), got heads={heads}, groups={groups}, dims={dims}"
        )


def attention_to_attention(attention: dict[str, torch.Tensor], config, options: InitOptions,
                           generator: torch.Generator, statistics=None,
                           layer_idx: int | None = None) -> dict[str, torch.Tensor]:
    """Full or sliding-window attention: the same weights (the window is in the config)."""
    return {f"{name}.{kind}": t.clone() for name in ATTENTION_KEYS for kind in ("weight", "bias")
            if (t := attention.get(f"{name}.{kind}")) is not None}


def attention_to_mamba2(attention: dict[str, torch.Tensor], config, options: InitOptions,
                        generator: torch.Generator, statistics=None,
                        layer_idx: int | None = None) -> dict[str, torch.Tensor]:
    """C <- W_q, B <- W_k, x <- W_v (KV heads repeated to every query head), out <- W_o; D = 0 like attention."""
    _check_heads(config, "mamba2", config.mamba_num_heads, config.mamba_num_groups,
                 (config.mamba_head_dim, config.mamba_state_size))
    return _mamba2_from_heads(attention, config.num_key_value_heads, config, options, generator, statistics)


def _mamba2_from_heads(attention: dict[str, torch.Tensor], kv_heads: int, config, options: InitOptions,
                       generator: torch.Generator, statistics) -> dict[str, torch.Tensor]:
    """attention_to_mamba2's mapping for attention tensors of `kv_heads` KV heads and their query heads (all of a
    layer's, or a head-wise layer's recurrent share), one Mamba2 head (with its own B and C) per query head."""
    group = config.num_attention_heads // config.num_key_value_heads
    heads, dim, hidden = kv_heads * group, config.head_dim, config.hidden_size
    a_log, dt_bias = _decay(heads, options, generator, statistics)
    value = repeat_heads(attention["v_proj.weight"], kv_heads, dim, group)
    return {
        "z_proj.weight": _gate(heads * dim, hidden, options, config.initializer_range, generator, value),
        "x_proj.weight": value,
        "B_proj.weight": repeat_heads(attention["k_proj.weight"], kv_heads, dim, group),
        "C_proj.weight": attention["q_proj.weight"].clone(),
        "dt_proj.weight": torch.zeros(heads, hidden),
        "conv_weight": _conv_weight(3 * heads * dim, config.conv_kernel_size, options, generator),  # x, B, C
        "conv_bias": torch.zeros(3 * heads * dim),
        "A_log": a_log,
        "dt_bias": dt_bias,
        "D": torch.zeros(heads),
        "norm_weight": torch.ones(dim),
        "out_proj.weight": attention["o_proj.weight"].clone(),
    }


def attention_to_gated_deltanet(attention: dict[str, torch.Tensor], config, options: InitOptions,
                                generator: torch.Generator, statistics=None,
                                layer_idx: int | None = None) -> dict[str, torch.Tensor]:
    """q <- W_q, k <- W_k, v <- W_v (KV heads repeated to every query head), o <- W_o; beta starts at 1/2 or at
    the teacher head's value (b_proj zero either way: beta does not depend on the token yet)."""
    _check_heads(config, "gated_deltanet", config.gdn_num_heads, config.gdn_num_k_heads,
                 (config.gdn_head_k_dim, config.gdn_head_v_dim))
    return _gated_deltanet_from_heads(attention, config.num_key_value_heads, config, options, generator, statistics)


def _gated_deltanet_from_heads(attention: dict[str, torch.Tensor], kv_heads: int, config, options: InitOptions,
                               generator: torch.Generator, statistics) -> dict[str, torch.Tensor]:
    """attention_to_gated_deltanet's mapping for attention tensors of `kv_heads` KV heads and their query heads (all
    of a layer's, or a head-wise layer's recurrent share), one GDN head per query head."""
    group = config.num_attention_heads // config.num_key_value_heads
    heads, dim, hidden = kv_heads * group, config.head_dim, config.hidden_size
    a_log, dt_bias = _decay(heads, options, generator, statistics)
    value = repeat_heads(attention["v_proj.weight"], kv_heads, dim, group)
    beta_bias = beta_bias_from_entropy(_needed(statistics).entropy) if options.beta == "teacher" else torch.zeros(heads)
    return {
        "q_proj.weight": attention["q_proj.weight"].clone(),
        "k_proj.weight": repeat_heads(attention["k_proj.weight"], kv_heads, dim, group),
        "v_proj.weight": value,
        "a_proj.weight": torch.zeros(heads, hidden),
        "b_proj.weight": torch.zeros(heads, hidden),
        "g_proj.weight": _gate(heads * dim, hidden, options, config.initializer_range, generator, value),
        "conv_weight": _conv_weight(3 * heads * dim, config.conv_kernel_size, options, generator),
        "A_log": a_log,
        "dt_bias": dt_bias,
        "b_bias": beta_bias,
        "norm_weight": torch.ones(dim),
        "o_proj.weight": attention["o_proj.weight"].clone(),
    }


def memory_options(options: InitOptions) -> InitOptions:
    """The init options of a memory branch held at zero by its memory_scale. Its gate never starts at zero (gate
    "zero" gives it the teacher gate, W_v): a zero gate as well would give both zero gradients, so neither could
    ever open."""
    return replace(options, gate="teacher") if options.gate == "zero" else options


def _branches(window: dict[str, torch.Tensor], memory: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A two-branch mixer's state: window.*, memory.*, and memory_scale = 0 (the layer starts as its window)."""
    return {**{f"window.{name}": t for name, t in window.items()},
            **{f"memory.{name}": t for name, t in memory.items()},
            "memory_scale": torch.zeros(config.hidden_size)}


def _attention_to_window_memory(memory: str, attention: dict[str, torch.Tensor], config, options: InitOptions,
                                generator: torch.Generator, statistics=None,
                                layer_idx: int | None = None) -> dict[str, torch.Tensor]:
    """window.* <- the attention weights unchanged; memory.* <- the `memory` mixer's own mapping; memory_scale = 0,
    so the layer starts as exactly its sliding window."""
    window = attention_to_attention(attention, config, options, generator)
    recurrent = INITIALIZERS[memory](attention, config, memory_options(options), generator, statistics, layer_idx)
    return _branches(window, recurrent, config)


def attention_to_window_gated_deltanet(attention: dict[str, torch.Tensor], config, options: InitOptions,
                                       generator: torch.Generator, statistics=None,
                                       layer_idx: int | None = None) -> dict[str, torch.Tensor]:
    """A sliding window copied from attention plus a Gated DeltaNet memory initialized as a gated_deltanet layer."""
    return _attention_to_window_memory("gated_deltanet", attention, config, options, generator, statistics, layer_idx)


def attention_to_window_mamba2(attention: dict[str, torch.Tensor], config, options: InitOptions,
                               generator: torch.Generator, statistics=None,
                               layer_idx: int | None = None) -> dict[str, torch.Tensor]:
    """A sliding window copied from attention plus a Mamba2 memory initialized as a mamba2 layer."""
    return _attention_to_window_memory("mamba2", attention, config, options, generator, statistics, layer_idx)


def select_heads(weight: torch.Tensor, heads: list[int], head_dim: int) -> torch.Tensor:
    """The rows of `heads` of a per-head projection [H * head_dim, C] -> [len(heads) * head_dim, C], in that order."""
    return weight.view(-1, head_dim, weight.shape[-1])[heads].reshape(-1, weight.shape[-1])


def attention_heads(attention: dict[str, torch.Tensor], config, kv_heads: list[int]) -> dict[str, torch.Tensor]:
    """The attention tensors of KV heads `kv_heads` and their query heads: q/k/v rows and o_proj columns."""
    group, dim = config.num_attention_heads // config.num_key_value_heads, config.head_dim
    query_heads = [h * group + j for h in kv_heads for j in range(group)]
    return {"q_proj.weight": select_heads(attention["q_proj.weight"], query_heads, dim),
            "k_proj.weight": select_heads(attention["k_proj.weight"], kv_heads, dim),
            "v_proj.weight": select_heads(attention["v_proj.weight"], kv_heads, dim),
            "o_proj.weight": select_heads(attention["o_proj.weight"].T, query_heads, dim).T.contiguous()}


def statistics_of_heads(statistics, config, kv_heads: list[int]):
    """HeadStatistics restricted to the query heads of KV heads `kv_heads` (None stays None)."""
    if statistics is None:
        return None
    group = config.num_attention_heads // config.num_key_value_heads
    query_heads = [h * group + j for h in kv_heads for j in range(group)]
    return type(statistics)(mean_distance=statistics.mean_distance[query_heads],
                            entropy=statistics.entropy[query_heads])


# The recurrent mapping a head-wise layer applies to its converted heads, by the recurrent mixer they form.
HEAD_MAPPINGS = {"gated_deltanet": _gated_deltanet_from_heads, "mamba2": _mamba2_from_heads}


def _attention_to_headwise(memory: str, attention: dict[str, torch.Tensor], config, options: InitOptions,
                           generator: torch.Generator, statistics=None,
                           layer_idx: int | None = None) -> dict[str, torch.Tensor]:
    """window.* <- the kept KV heads' attention weights, exactly; memory.* <- the other KV heads' weights through
    the `memory` mixer's own mapping; memory_scale = 0, so the layer starts as the teacher's attention with the
    recurrent heads' outputs removed (its kept heads' o_proj columns)."""
    kept, recurrent = headwise_split(config, layer_idx)
    heads = HEAD_MAPPINGS[memory](attention_heads(attention, config, recurrent), len(recurrent), config,
                                  memory_options(options), generator,
                                  statistics_of_heads(statistics, config, recurrent))
    return _branches(attention_heads(attention, config, kept), heads, config)


def attention_to_headwise_gated_deltanet(attention: dict[str, torch.Tensor], config, options: InitOptions,
                                         generator: torch.Generator, statistics=None,
                                         layer_idx: int | None = None) -> dict[str, torch.Tensor]:
    """The kept KV heads' attention plus Gated DeltaNet heads initialized as a gated_deltanet layer's."""
    return _attention_to_headwise("gated_deltanet", attention, config, options, generator, statistics, layer_idx)


def attention_to_headwise_mamba2(attention: dict[str, torch.Tensor], config, options: InitOptions,
                                 generator: torch.Generator, statistics=None,
                                 layer_idx: int | None = None) -> dict[str, torch.Tensor]:
    """The kept KV heads' attention plus Mamba2 heads initialized as a mamba2 layer's."""
    return _attention_to_headwise("mamba2", attention, config, options, generator, statistics, layer_idx)


INITIALIZERS = {
    "full_attention": attention_to_attention,
    "sliding_attention": attention_to_attention,
    "mamba2": attention_to_mamba2,
    "gated_deltanet": attention_to_gated_deltanet,
    "window_gated_deltanet": attention_to_window_gated_deltanet,
    "window_mamba2": attention_to_window_mamba2,
    "headwise_gated_deltanet": attention_to_headwise_gated_deltanet,
    "headwise_mamba2": attention_to_headwise_mamba2,
}
