"""Head-wise hybrids: in one layer some of the teacher's KV heads (each with its query heads) stay softmax attention
and the other query heads become recurrent heads (Gated DeltaNet or Mamba2), their outputs joined per head before the
output projection.

The head split of "Hybrid Architectures for Language Models: Systematic Analysis and Design Insights"
(arXiv:2510.04800). The attention part is a smaller GQA attention, so the layer caches the keys of its kept KV heads
only, plus one recurrent state for the other heads.
"""

from torch import nn

from .attention import Attention
from .configuration_hybrid import headwise_split
from .window_memory import MEMORY_MIXERS, WindowMemoryMixer


class HeadwiseMixer(WindowMemoryMixer):
    """out = W_o [attention heads; memory_scale-scaled recurrent heads] = window(x) + memory_scale * memory(x).

    The teacher's o_proj is split by its input columns, so one output projection over the heads joined per head is
    the sum of the two parts' own output projections. window: Attention over the KV heads
    `config.headwise_kv_heads[layer]` keeps (full causal, or with `config.headwise_window` the config's sliding window
    and sinks), under `window.` as in a window + memory layer; memory: a GatedDeltaNetMixer or Mamba2Mixer
    (`memory_type`) with one head per query head of the other KV heads, each with its own q/k (B/C), under
    `memory.`; memory_scale [C] as in WindowMemoryMixer (conversion starts it at zero: the layer is then exactly the
    teacher's attention with the recurrent heads' outputs removed).
    """

    def branches(self, config, layer_idx: int, memory_type: str) -> tuple[Attention, nn.Module]:
        kept, recurrent = headwise_split(config, layer_idx)
        group = config.num_attention_heads // config.num_key_value_heads
        window = config.sliding_window if config.headwise_window else None
        attention = Attention(config, layer_idx, window=window, sinks=config.sliding_window_sinks, kv_heads=len(kept))
        return attention, MEMORY_MIXERS[memory_type](config, layer_idx, heads=len(recurrent) * group)
