"""Build a hybrid from teacher tensors: the config, a declarative key map, and a model that owns the mapped tensors.

Every teacher tensor is consumed by the key map or an initializer, or dropped with a stated reason;
anything else stops the conversion, so a teacher with parts we do not understand is never half-converted.
"""

import re
from collections.abc import Callable

import torch
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..errors import UserError
from ..model import HybridConfig, HybridConfigError, HybridForCausalLM
from ..model.configuration_hybrid import STATEFUL_TYPES
from ..model.modeling_hybrid import FP32_PARAMETERS
from .init import INITIALIZERS, InitOptions
from .statistics import HeadStatistics

SUPPORTED_MODEL_TYPES = ("llama",)

# teacher key -> hybrid key; "{i}" is a layer index. self_attn tensors go through INITIALIZERS instead.
KEPT_KEYS = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.mlp.{proj}.weight": "model.layers.{i}.mlp.{proj}.weight",
    "model.layers.{i}.mlp.{proj}.bias": "model.layers.{i}.mlp.{proj}.bias",
}
DROPPED_KEYS = {
    r"model\.rotary_emb\.inv_freq|model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq": "recomputed from the config",
}
_FIELDS = {"i": r"(?P<i>\d+)", "proj": r"(?P<proj>gate_proj|up_proj|down_proj)"}


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern + "$")


_KEPT = [(_template_regex(src), dst) for src, dst in KEPT_KEYS.items()]
_KEEP_FP32 = re.compile(FP32_PARAMETERS)


def check_teacher(config: PretrainedConfig) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"teacher architecture {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(Llama-family decoders: RMSNorm, SwiGLU MLP, RoPE, grouped KV heads)"
        )


def hybrid_config_from_teacher(teacher_config: PretrainedConfig, layer_types: list[str], *,
                               dtype: torch.dtype | None = None, **mixer_options) -> HybridConfig:
    """The teacher's dimensions, token ids and RoPE, with `layer_types`, the hybrid's dtype (default: the teacher
    config's, else fp32) and mixer options on top."""
    check_teacher(teacher_config)
    shared = {
        name: getattr(teacher_config, name)
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
            "rope_parameters", "attention_bias", "mlp_bias",
        )
    }
    dtype = dtype or teacher_config.dtype or torch.float32
    try:
        return HybridConfig(layer_types=list(layer_types), dtype=dtype, **shared, **mixer_options)
    except HybridConfigError as err:  # the plan's or the options' values, for this teacher
        raise UserError(f"the hybrid's config cannot be built: {err}") from err


def convert_state(
    keys: list[str], read: Callable[[str], torch.Tensor], config: HybridConfig, options: InitOptions, seed: int,
    statistics: dict[int, HeadStatistics] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(hybrid state dict in config.dtype, {dropped teacher key: reason}); reads each teacher tensor once, layer by
    layer. Initializers compute new values in fp32, rounded once here; FP32_PARAMETERS stay fp32. `statistics`
    holds the teacher's per-head attention statistics of each replaced layer, for the teacher-calibrated options."""
    statistics = statistics or {}
    dtype = config.dtype
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for key in keys:
        for regex, target in _KEPT:
            if match := regex.match(key):
                state[target.format(**match.groupdict())] = read(key).to(dtype)
                consumed.add(key)
    for i, kind in enumerate(config.layer_types):
        prefix = f"model.layers.{i}.self_attn."
        attention_keys = [k for k in keys if k.startswith(prefix) and k[len(prefix):].split(".")[0] in
                          ("q_proj", "k_proj", "v_proj", "o_proj")]
        attention = {k[len(prefix):]: read(k).float() for k in attention_keys}  # one layer at a time
        if kind in STATEFUL_TYPES and any(k.endswith(".bias") for k in attention):
            raise UserError(f"layer {i}: attention biases have no place in a {kind} layer; keep it as attention")
        for name, tensor in INITIALIZERS[kind](attention, config, options, generator, statistics.get(i),
                                               layer_idx=i).items():
            key = f"model.layers.{i}.mixer.{name}"
            state[key] = tensor.to(torch.float32 if _KEEP_FP32.search(key) else dtype)
        consumed.update(attention_keys)
    dropped = {k: reason for k in keys if k not in consumed for pattern, reason in DROPPED_KEYS.items()
               if re.fullmatch(pattern, k)}
    if config.tie_word_embeddings and "lm_head.weight" in state:
        dropped["lm_head.weight"] = "tied to model.embed_tokens.weight"
        del state["lm_head.weight"]
    leftover = sorted(set(keys) - consumed - set(dropped))
    if leftover:
        raise UserError(f"teacher tensors with no mapping: {', '.join(leftover[:5])}{' ...' if len(leftover) > 5 else ''}")
    return state, dropped


def model_from_state(config: HybridConfig, state: dict[str, torch.Tensor]) -> HybridForCausalLM:
    """A HybridForCausalLM that owns `state`'s tensors (no second copy is allocated)."""
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    if config.tie_word_embeddings:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in any state dict: rebuild RoPE's inverse frequencies for real.
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    model.tie_weights()
    return model.eval()


def convert_model(teacher, layer_types: list[str], *, seed: int = 0, options: InitOptions = InitOptions(),
                  sink_tokens: int = 0, recurrent_rope: bool = False):
    """In memory: a HybridForCausalLM initialized from `teacher` (a LlamaForCausalLM) for `layer_types`, in the
    teacher's dtype, its sliding windows keeping the first `sink_tokens` tokens, its recurrent mixers rotating by
    RoPE with `recurrent_rope`."""
    config = hybrid_config_from_teacher(teacher.config, layer_types, dtype=teacher.dtype,
                                        sliding_window_sinks=sink_tokens, recurrent_rope=recurrent_rope)
    teacher_state = teacher.state_dict()
    state, _ = convert_state(list(teacher_state), lambda k: teacher_state[k].detach().clone(), config, options, seed)
    return model_from_state(config, state)
