"""HybridForCausalLM: a Llama decoder whose token mixer per layer is picked from `config.layer_types` by one table."""

import re

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from .attention import Attention
from .cache import HybridCache
from .configuration_hybrid import HEADWISE_TYPES, ROPE_TYPES, WINDOW_MEMORY_TYPES, HybridConfig
from .context import SequenceContext, real_token_rank
from .gated_deltanet import GatedDeltaNetMixer
from .headwise import HeadwiseMixer
from .mamba2 import Mamba2Mixer
from .mlp import GatedMLP
from .window_memory import WindowMemoryMixer

# Parameters that set a recurrence's time scales stay fp32 in every dtype: in bf16, A_log and dt_bias (magnitudes
# 1-5) have steps of about 0.02, so the small updates distillation makes to them would round away, and the decay
# exp(-exp(A_log) * softplus(.)) would move by whole percents per step of rounding. The same holds for the memory
# branch of a window + memory layer and the recurrent heads of a head-wise one.
_HALF_LIFE_NAMES = ("A_log", "dt_bias")  # what sets each recurrent head's half-life at a zero gate input


def _recurrent_parameters(*names: str) -> str:
    """A pattern for the parameters `names` of a layer's recurrent mixer or its memory branch."""
    return rf"mixer\.(?:memory\.)?(?:{'|'.join(names)})$"


FP32_PARAMETERS = _recurrent_parameters(*_HALF_LIFE_NAMES, "D")
HALF_LIFE_PARAMETERS = _recurrent_parameters(*_HALF_LIFE_NAMES)  # distill's `half_life_lr`
# The recurrent branch of a window + memory or head-wise layer: its mixer and the scale that opens it (distill's
# `memory_lr`).
MEMORY_BRANCH_PARAMETERS = r"mixer\.(?:memory\.|memory_scale$)"


def _branch_mixer(mixer_class, memory_type: str):
    """The constructor (config, layer_idx) of a two-branch layer type whose recurrent branch is `memory_type`."""
    return lambda config, layer_idx: mixer_class(config, layer_idx, memory_type)


MIXERS = {
    "full_attention": lambda config, layer_idx: Attention(config, layer_idx, window=None),
    "sliding_attention": lambda config, layer_idx: Attention(config, layer_idx, window=config.sliding_window,
                                                             sinks=config.sliding_window_sinks),
    "mamba2": Mamba2Mixer,
    "gated_deltanet": GatedDeltaNetMixer,
    **{kind: _branch_mixer(WindowMemoryMixer, memory) for kind, memory in WINDOW_MEMORY_TYPES.items()},
    **{kind: _branch_mixer(HeadwiseMixer, memory) for kind, memory in HEADWISE_TYPES.items()},
}


class HybridDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = MIXERS[self.layer_type](config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(self, hidden_states: torch.Tensor, context: SequenceContext, layer_cache=None) -> torch.Tensor:
        hidden_states = hidden_states + self.mixer(self.input_layernorm(hidden_states), context, layer_cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _is_stateful = True  # recurrent states cannot be rolled back, so generate() refuses assisted decoding
    _keep_in_fp32_modules_strict = [FP32_PARAMETERS]  # from_pretrained(dtype=bf16 or fp16) leaves these fp32

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache for us: the model makes its HybridCache on the first forward.
        return False

    @torch.no_grad()
    def cast_for_saving(self, dtype: torch.dtype) -> "HybridPreTrainedModel":
        """Cast in place to `dtype`, FP32_PARAMETERS excepted: the dtypes from_pretrained(dtype=...) would give."""
        keep_fp32 = re.compile(FP32_PARAMETERS)
        for name, param in self.named_parameters():
            param.data = param.data.to(torch.float32 if keep_fp32.search(name) else dtype)
        self.config.dtype = dtype
        return self

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (Mamba2Mixer, GatedDeltaNetMixer, WindowMemoryMixer)):
            for name, value in module.new_parameter_values().items():
                init.copy_(getattr(module, name), value)


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPast:
        """attention_mask [B, past + T] (0 marks left padding); position_ids default to the count of real tokens."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, C]
        length = hidden_states.shape[1]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = HybridCache(self.config)
        past_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: the mixers take their unmasked fast paths
        if position_ids is None:
            position_ids = _position_ids(attention_mask, past_tokens, length, hidden_states.device)
        rotates = self.config.recurrent_rope or any(t in ROPE_TYPES for t in self.config.layer_types)
        context = SequenceContext(
            position_embeddings=self.rotary_emb(hidden_states, position_ids) if rotates else None,
            attention_mask=attention_mask,
            past_tokens=past_tokens,
        )
        all_hidden_states = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            layer_cache = past_key_values.layers[i] if past_key_values is not None else None
            hidden_states = layer(hidden_states, context, layer_cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        if past_key_values is not None:
            past_key_values.seen_tokens += length
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )


def _position_ids(attention_mask, past_tokens: int, length: int, device) -> torch.LongTensor:
    """RoPE positions: the index among real tokens, so a left-padded sequence is positioned as if run alone."""
    if attention_mask is None:
        return torch.arange(past_tokens, past_tokens + length, device=device)[None]
    return real_token_rank(attention_mask).clamp_min(0)[:, -length:]


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, kept, :])  # [B, T', V]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )
