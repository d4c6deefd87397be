"""HybridConfig: a Llama decoder whose per-layer token mixer is attention, sliding-window attention, Mamba2, GDN, a
sliding window plus a Mamba2 / GDN memory, or a head-wise split of attention heads and GDN or Mamba2 heads."""

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

ATTENTION_TYPES = ("full_attention", "sliding_attention")
RECURRENT_TYPES = ("mamba2", "gated_deltanet")
# Intra-layer hybrids: a sliding window plus a recurrent memory in one mixer (model/window_memory.py), by the
# recurrent mixer their memory branch is.
WINDOW_MEMORY_TYPES = {"window_gated_deltanet": "gated_deltanet", "window_mamba2": "mamba2"}
# Head-wise hybrids: some of the teacher's KV groups stay attention, the other heads become recurrent heads
# (model/headwise.py), by the recurrent mixer those heads form.
HEADWISE_TYPES = {"headwise_gated_deltanet": "gated_deltanet", "headwise_mamba2": "mamba2"}
LAYER_TYPES = ATTENTION_TYPES + RECURRENT_TYPES + tuple(WINDOW_MEMORY_TYPES) + tuple(HEADWISE_TYPES)
# Layers made of an attention branch and a recurrent branch summed (both kinds above), by the recurrent branch's mixer.
BRANCH_TYPES = {**WINDOW_MEMORY_TYPES, **HEADWISE_TYPES}
# Layers that hold a recurrent state (their own or their memory branch's).
STATEFUL_TYPES = RECURRENT_TYPES + tuple(BRANCH_TYPES)
# Layers that attend with RoPE (all or part of their output).
ROPE_TYPES = ATTENTION_TYPES + tuple(BRANCH_TYPES)


class HybridConfigError(ValueError):
    """A HybridConfig field holds a value the model cannot be built from."""


@strict
class HybridConfig(PretrainedConfig):
    """Teacher (Llama) dimensions plus `layer_types` and the hyperparameters of each mixer.

    Mixer sizes left as None are derived from the attention shape, which is what conversion from
    attention needs: Mamba2 and GDN get one head per query head, with head and state dims equal to
    `head_dim`. The derived values are written back, so a saved config is explicit.
    """

    model_type = "hybridize"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    layer_types: list[str] | None = None
    sliding_window: int = 512
    sliding_window_sinks: int = 0  # sliding layers also see each row's first this-many real tokens ("sinks")
    # window_* layers: the memory branch reads only tokens that have left the window (False: every token so far)
    memory_outside_window: bool = False
    # headwise_* layers: the KV heads (each with its query heads) that stay attention, by layer index ("3": [0, 2]);
    # a headwise layer left out keeps its first half (at least one). Filled in, so a saved config is explicit.
    headwise_kv_heads: dict[str, list[int]] | None = None
    headwise_window: bool = False  # headwise_* layers' attention heads see a sliding window (with sinks), not all
    conv_kernel_size: int = 4
    mamba_num_heads: int | None = None
    mamba_head_dim: int | None = None
    mamba_state_size: int | None = None
    mamba_num_groups: int | None = None
    mamba_chunk_size: int = 64
    gdn_num_heads: int | None = None
    gdn_num_k_heads: int | None = None
    gdn_head_k_dim: int | None = None
    gdn_head_v_dim: int | None = None
    gdn_chunk_size: int = 64
    gdn_fused_inputs: bool = True  # the gate, beta and q/k L2 norms formed inside the GDN kernels
    # GDN q, k and Mamba2 C, B (also in the recurrent branches of window_* and headwise_* layers) rotated by the
    # model's RoPE before the recurrence, as attention rotates its q, k (docs/model.md)
    recurrent_rope: bool = False

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        heads, dim = self.num_attention_heads, self.head_dim
        self.mamba_num_heads = self.mamba_num_heads or heads
        self.mamba_head_dim = self.mamba_head_dim or dim
        self.mamba_state_size = self.mamba_state_size or dim
        self.mamba_num_groups = self.mamba_num_groups or self.mamba_num_heads
        self.gdn_num_heads = self.gdn_num_heads or heads
        self.gdn_num_k_heads = self.gdn_num_k_heads or self.gdn_num_heads
        self.gdn_head_k_dim = self.gdn_head_k_dim or dim
        self.gdn_head_v_dim = self.gdn_head_v_dim or dim
        default_kept = list(range(max(1, self.num_key_value_heads // 2)))
        given = self.headwise_kv_heads or {}
        filled = {str(i): default_kept for i, kind in enumerate(self.layer_types) if kind in HEADWISE_TYPES}
        self.headwise_kv_heads = {layer: sorted(kept) for layer, kept in {**filled, **given}.items()}
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise HybridConfigError naming the first field that cannot work."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise HybridConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise HybridConfigError(f"layer_types[{i}] is {kind!r}; allowed values: {', '.join(LAYER_TYPES)}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"must divide num_attention_heads ({self.num_attention_heads}), got {self.num_key_value_heads}")
        _require(self.mamba_num_heads % self.mamba_num_groups == 0, "mamba_num_groups",
                 f"must divide mamba_num_heads ({self.mamba_num_heads}), got {self.mamba_num_groups}")
        _require(self.gdn_num_heads % self.gdn_num_k_heads == 0, "gdn_num_k_heads",
                 f"must divide gdn_num_heads ({self.gdn_num_heads}), got {self.gdn_num_k_heads}")
        _require(2 <= self.conv_kernel_size <= 4, "conv_kernel_size", f"must be in 2..4, got {self.conv_kernel_size}")
        _require(self.sliding_window >= 1, "sliding_window", f"must be >= 1, got {self.sliding_window}")
        _require(self.sliding_window_sinks >= 0, "sliding_window_sinks",
                 f"must be >= 0, got {self.sliding_window_sinks}")
        _require(self.hidden_act == "silu", "hidden_act", f"allowed values: silu; got {self.hidden_act!r}")
        for layer, kept in self.headwise_kv_heads.items():
            _require(layer.isdigit() and int(layer) < len(self.layer_types)
                     and self.layer_types[int(layer)] in HEADWISE_TYPES, "headwise_kv_heads",
                     f"names layer {layer!r}, which is not a headwise layer")
            _require(0 < len(kept) < self.num_key_value_heads and len(set(kept)) == len(kept)
                     and all(0 <= h < self.num_key_value_heads for h in kept), "headwise_kv_heads",
                     f"of layer {layer} must be distinct KV heads in 0..{self.num_key_value_heads - 1}, at least one "
                     f"and not all {self.num_key_value_heads} (got {kept})")
        if self.recurrent_rope:
            recurrent = {BRANCH_TYPES.get(kind, kind) for kind in self.layer_types}  # the mixers that recur
            for mixer, name in (("gated_deltanet", "gdn_head_k_dim"), ("mamba2", "mamba_state_size")):
                _require(mixer not in recurrent or getattr(self, name) == self.head_dim, name,
                         f"must equal head_dim ({self.head_dim}) for recurrent_rope, got {getattr(self, name)}")
        for name in ("mamba_chunk_size", "gdn_chunk_size"):
            value = getattr(self, name)
            _require(value in (16, 32, 64, 128), name, f"allowed values: 16, 32, 64, 128; got {value}")

    def validate_layer_type(self) -> None:
        """Replaces transformers' check, whose list of layer types does not know ours."""
        self.check()


def headwise_split(config, layer_idx: int) -> tuple[list[int], list[int]]:
    """(KV heads kept as attention, KV heads whose query heads become recurrent heads) of a headwise layer."""
    kept = config.headwise_kv_heads[str(layer_idx)]
    return kept, [h for h in range(config.num_key_value_heads) if h not in kept]


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise HybridConfigError(f"{field} {message}")
