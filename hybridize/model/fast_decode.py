"""Fast greedy decoding for the hybrid: preallocated KV slots and recurrent states, and one CUDA-graph-captured step.

`generate()` pays Python and allocator overhead for every layer of every token; for a small model that
overhead, not the GPU, sets the decode speed. StaticDecoder removes it:
- every buffer a decode step touches is allocated once: attention K/V slots ([B, Hkv, S, D], S = the
  longest sequence for full attention, the window for sliding attention, used as a ring, plus one slot per
  sink token that a sink window keeps after the token has left the ring), and the
  Mamba2 / GDN conv windows and fp32 recurrent states, updated in place by the decode-step kernels (a window +
  memory layer has both: its window's slots and its memory's state; a head-wise layer too: its attention heads'
  slots and its recurrent heads' state);
- the layers whose attention windows have one shape share one slot-validity mask and the step's write slots,
  updated once a step; each attention layer's RoPE and K/V writes are then one kernel (rope_store), and each
  Gated DeltaNet or Mamba2 mixer's step from its projections to its output projection another (the layer steps);
- the step reads its position, token and write slot from device tensors, so it has no Python-side
  state and is captured once as a CUDA graph; decoding N tokens is N graph replays;
- the step is compiled with torch.compile first (on a GPU, by default), so the dozens of small
  element-wise kernels per layer fuse: inside a CUDA graph the launch count, not Python, is what is left;
- a window + memory (or head-wise) layer's two branches run at once on a GPU, the memory branch on a second stream
  that joins before the layer's MLP, so the step waits for the longer branch, not both; the step is then compiled
  as pieces between those forks (StaticDecoder._step), one compiled piece serving every layer of its shape;
- for the same reason each layer's input projections (a window + memory layer's both branches' together) and its
  MLP's gate and up projections are one GEMM each, over weights concatenated once (FusedProjection): a second copy
  of those weights, re-read from the model at every prefill, so a decoder built once follows a model in training;
- prefill runs the model's own forward (the chunked kernels), then copies its cache into the slots;
- the next token is the argmax, or (with `sampling`) drawn by `sampling.choose_tokens` from uniforms the caller
  gives, held in a device buffer the step reads, so sampling adds no RNG state to the graph.
On the CPU the same step runs eagerly (or compiled, when asked), which is how the tests check it
against `generate()`.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import ops
from .cache import RecurrentLayerCache, SinkWindowLayer
from .compiling import allow_recompiles
from .configuration_hybrid import ATTENTION_TYPES, BRANCH_TYPES
from .context import SequenceContext, real_token_rank
from .projections import FusedProjection, fusable, project
from .sampling import Sampling, choose_tokens

_SLOT_ALIGN = 8  # attention kernels prefer key lengths that are a multiple of 8; extra slots stay masked


@dataclass
class SlotMasks:
    """Token at stream index i lives in slot i % ring (ring = window or S); a row's j-th real token, j < sinks, is
    also kept in slot ring + j, valid once it has left the ring. Which slots are valid, where the sinks came from and
    which slots a step writes depend on this shape (ring, sinks, S) and the rows' tokens only, so the attention layers
    of one shape share one SlotMasks, which a decode step updates once for all of them."""

    ring: int
    sinks: int
    valid: torch.Tensor  # [B, S] bool: the slot holds a real (not padding) token the next query may see
    sink_index: torch.Tensor  # [B, sinks] stream index of each sink token; NO_TOKEN until seen
    slot: torch.Tensor  # [1] the ring slot the step's token goes to
    sink_slot: torch.Tensor  # [B] the sink slot it also goes to in each row, or -1


@dataclass
class AttentionSlots:
    """One attention layer's static cache: its K/V slots, and the masks it shares with the layers of its shape."""

    keys: torch.Tensor  # [B, Hkv, S, D]
    values: torch.Tensor  # [B, Hkv, S, D]
    masks: SlotMasks


NO_TOKEN = 2**62  # a sink_index that never leaves the ring: the row has not had that many real tokens yet


@dataclass
class WindowMemorySlots:
    """A window + memory (or head-wise) layer's static cache: its attention branch's slots and its recurrent branch's
    conv window and state."""

    window: AttentionSlots
    memory: RecurrentLayerCache


@dataclass
class LayerProjections:
    """One layer's input projections as one GEMM each (None where an adapter wraps a projection): the mixer's (for a
    window + memory layer, the window's `window_groups` groups, then the memory's) and the MLP's gate and up."""

    mixer: FusedProjection | None
    mlp: FusedProjection | None
    window_groups: int = 0

    @classmethod
    def of(cls, layer, kind: str) -> "LayerProjections":
        mixer, window_groups = layer.mixer, 0
        if kind in BRANCH_TYPES:
            window_groups = len(mixer.window.input_groups)
            groups = mixer.window.input_groups + mixer.memory.input_groups
        else:
            groups = mixer.input_groups
        fused = [FusedProjection(g) if fusable(g) else None for g in (groups, layer.mlp.input_groups)]
        return cls(*fused, window_groups)

    def fused(self) -> list[FusedProjection]:
        return [p for p in (self.mixer, self.mlp) if p is not None]


def _projected(projection: FusedProjection | None, x: torch.Tensor):
    return projection(x) if projection is not None else None


class StaticDecoder:
    """Greedy (or sampled) decoding of up to `batch_size` sequences of at most `max_length` tokens (prompt + new).

    Build one per (batch size, max length) and reuse it: the step is compiled and the CUDA graph captured
    in the constructor. `use_cuda_graph=None` and `compile_step=None` mean: when the model is on a GPU.
    """

    def __init__(self, model, batch_size: int, max_length: int, *, use_cuda_graph: bool | None = None,
                 compile_step: bool | None = None, sampling: Sampling = Sampling(temperature=0), log=print):
        self.model = model.eval()
        self.sampling = sampling
        self.config = model.config
        self.batch_size, self.max_length = batch_size, max_length
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        on_gpu = self.device.type == "cuda"
        self.use_cuda_graph = on_gpu if use_cuda_graph is None else use_cuda_graph
        if self.use_cuda_graph and not on_gpu:
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.compiled = on_gpu if compile_step is None else compile_step
        self._use_pieces(compiled=self.compiled)
        with torch.inference_mode():
            self._allocate()
            self._warm_up(log)
            self._graph = self._capture() if self.use_cuda_graph else None
            self._reset()

    def _allocate(self) -> None:
        batch, device = self.batch_size, self.device
        self._window_shapes: dict[tuple[int, int, int], SlotMasks] = {}  # by (ring, sinks, slots)
        self.layer_caches: list[AttentionSlots | RecurrentLayerCache | WindowMemorySlots] = []
        for i, kind in enumerate(self.config.layer_types):
            mixer = self.model.model.layers[i].mixer
            if kind in ATTENTION_TYPES:
                self.layer_caches.append(self._attention_slots(mixer))
            elif kind in BRANCH_TYPES:
                self.layer_caches.append(WindowMemorySlots(self._attention_slots(mixer.window),
                                                           self._recurrent_state(mixer.memory)))
            else:
                self.layer_caches.append(self._recurrent_state(mixer))
        self.projections = [LayerProjections.of(layer, kind)
                            for layer, kind in zip(self.model.model.layers, self.config.layer_types)]
        self._layer_pieces = list(zip(self.model.model.layers, self.projections, self.layer_caches))
        self.tokens = torch.zeros(batch, self.max_length, dtype=torch.long, device=device)  # prompt + generated
        self.uniforms = torch.zeros(batch, self.max_length, dtype=torch.float32, device=device)  # per token column
        self._next_token = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1] input of the next step
        self._position = torch.zeros(batch, dtype=torch.long, device=device)  # [B] RoPE position of that token
        self._index = torch.zeros((), dtype=torch.long, device=device)  # its stream index (same for every row)

    def _attention_slots(self, attention) -> AttentionSlots:
        batch, device = self.batch_size, self.device
        ring = self.max_length if attention.window is None else min(attention.window, self.max_length)
        sinks = attention.sinks if ring < self.max_length else 0  # no token leaves a ring this long
        slots = -(-(ring + sinks) // _SLOT_ALIGN) * _SLOT_ALIGN
        shape = (batch, attention.num_kv_heads, slots, attention.head_dim)
        if (ring, sinks, slots) not in self._window_shapes:  # the first layer of this shape
            self._window_shapes[(ring, sinks, slots)] = SlotMasks(
                ring=ring, sinks=sinks,
                valid=torch.zeros(batch, slots, dtype=torch.bool, device=device),
                sink_index=torch.full((batch, sinks), NO_TOKEN, dtype=torch.long, device=device),
                slot=torch.zeros(1, dtype=torch.long, device=device),
                sink_slot=torch.full((batch,), -1, dtype=torch.long, device=device),
            )
        return AttentionSlots(keys=torch.zeros(shape, dtype=self.dtype, device=device),
                              values=torch.zeros(shape, dtype=self.dtype, device=device),
                              masks=self._window_shapes[(ring, sinks, slots)])

    def _recurrent_state(self, mixer) -> RecurrentLayerCache:
        cache = RecurrentLayerCache()
        cache.conv_state = torch.zeros(self.batch_size, sum(mixer.conv_channels), self.config.conv_kernel_size - 1,
                                       dtype=self.dtype, device=self.device)
        cache.recurrent_state = torch.zeros(self.batch_size, *mixer.state_shape, dtype=torch.float32,
                                            device=self.device)
        if hasattr(mixer, "new_pending"):  # a memory that reads only what has left its window
            cache.pending = mixer.new_pending(self.batch_size, self.dtype, self.device)
        return cache

    def _attention_slot_caches(self) -> list[AttentionSlots]:
        return [c.window if isinstance(c, WindowMemorySlots) else c for c in self.layer_caches
                if isinstance(c, (AttentionSlots, WindowMemorySlots))]

    def _cache_buffers(self) -> list[torch.Tensor]:
        """Every cache tensor once (the masks a window shape's layers share, once)."""
        out = []
        for cache in self._attention_slot_caches():
            out += [cache.keys, cache.values]
        for masks in self._window_shapes.values():
            out += [masks.valid, masks.sink_index]  # not slot and sink_slot: every step rewrites them
        for cache in self.layer_caches:
            recurrent = cache.memory if isinstance(cache, WindowMemorySlots) else cache
            if isinstance(recurrent, RecurrentLayerCache):
                out += recurrent.tensors()
        return out

    def _reset(self) -> None:
        for buffer in [self.tokens, self.uniforms, self._next_token, self._position, self._index,
                       *self._cache_buffers()]:
            buffer.zero_()
        for masks in self._window_shapes.values():
            masks.sink_index.fill_(NO_TOKEN)
            masks.sink_slot.fill_(-1)

    def cache_nbytes(self) -> int:
        """Bytes of the KV slots, conv windows and recurrent states of all `batch_size` rows."""
        return sum(b.numel() * b.element_size() for b in self._cache_buffers())

    def _use_pieces(self, *, compiled: bool) -> None:
        """The step's pieces (see _step), each compiled on its own or eager, and where each segment starts and ends."""
        kinds = self.config.layer_types
        forks = [i for i, kind in enumerate(kinds) if kind in BRANCH_TYPES]
        # segment k: after fork k - 1 joins (none for the first), the layers up to fork k (the end for the last)
        self._segments = list(zip([None] + forks, [range(a, b) for a, b in zip([0] + [i + 1 for i in forks],
                                                                            forks + [len(kinds)])], forks + [None]))
        # the memory branches' stream; the CPU runs the branches in turn
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and forks else None
        if compiled:
            allow_recompiles()
        wrap = (lambda piece: torch.compile(piece, dynamic=False)) if compiled else (lambda piece: piece)
        self._run_segment, self._run_window, self._run_memory = map(wrap, (_segment, _window_branch, _memory_branch))

    def _step(self) -> None:
        """Decode one token for every row: read _next_token at _index, write the chosen one to tokens[:, _index + 1].

        A window + memory (or head-wise) layer's two branches depend only on the layer's input, so on a GPU its
        memory branch runs on a second stream while its window branch runs on the first, joined before the layer's
        MLP: each branch is a few small kernels that fill few SMs, and the step's critical path then holds the longer
        branch instead of both. Around those forks the step runs as pieces: a segment from one join to the next fork
        (the layers in between, with their norms, projections and MLPs), and the two branches of each such layer,
        each compiled on its own. Pieces take the layers, caches and projections they run as arguments, so one
        compiled piece serves every layer of its shape; a plan without two-branch layers is one segment, the whole
        step.
        """
        hidden = cos = sin = mixed = None
        pieces = self._layer_pieces  # (layer, projections, cache) each
        for joined, between, fork in self._segments:
            out = self._run_segment(
                self if joined is None or fork is None else None,
                None if joined is None else pieces[joined][:2], [pieces[i] for i in between],
                None if fork is None else pieces[fork][:2], hidden, mixed, cos, sin)
            if fork is None:
                return
            hidden, cos, sin, x, window_part, memory_part = out
            mixed = self._branches(fork, x, cos, sin, window_part, memory_part)

    def _branches(self, i: int, x, cos, sin, window_part, memory_part) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's window and memory outputs, [B, 1, C] each; on a GPU the memory branch on the side stream. The
        inputs stay referenced until the join, so the allocator cannot give their memory to the first stream while
        the second still reads it."""
        mixer, cache = self.model.model.layers[i].mixer, self.layer_caches[i]
        if self._side_stream is None:
            return (self._run_window(mixer, cache.window, x, cos, sin, window_part),
                    self._run_memory(mixer, cache.memory, x, cos, sin, memory_part))
        main = torch.cuda.current_stream(self.device)
        self._side_stream.wait_stream(main)
        with torch.cuda.stream(self._side_stream):
            memory = self._run_memory(mixer, cache.memory, x, cos, sin, memory_part)
        window = self._run_window(mixer, cache.window, x, cos, sin, window_part)
        main.wait_stream(self._side_stream)
        return window, memory

    def _start_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The embedding of each row's token [B, 1, C], its RoPE tables [B, 1, D] each, and the slot masks' update."""
        model = self.model.model
        hidden = model.embed_tokens(self._next_token)  # [B, 1, C]
        cos, sin = model.rotary_emb(hidden, self._position[:, None])  # [B, 1, D] each
        for masks in self._window_shapes.values():
            _admit_token(masks, self._index, self._position)
        return hidden, cos, sin

    def _end_step(self, hidden: torch.Tensor) -> None:
        """The next token from the last layer's output [B, 1, C], written to tokens and to the next step's input."""
        logits = self.model.lm_head(self.model.model.norm(hidden))[:, -1]  # [B, V]
        column = (self._index + 1).view(1)
        chosen = choose_tokens(logits, self.uniforms.index_select(1, column)[:, 0], self.sampling)  # [B, 1]
        self.tokens.index_copy_(1, column, chosen)
        self._next_token.copy_(chosen)
        self._position.add_(1)
        self._index.add_(1)

    def _warm_up(self, log) -> None:
        """Two steps on the zeroed buffers: torch.compile and Triton compile and autotune here, never in a capture.

        A step that torch.compile cannot handle falls back to the eager step, said in one line: the decode
        is then slower but still exact.
        """
        stream = torch.cuda.Stream(self.device) if self.use_cuda_graph else None
        if stream is not None:  # capture needs the warm-up on a side stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            try:
                for _ in range(2):
                    self._step()
            except Exception as err:  # compile errors come from dynamo, inductor and Triton alike
                if not self.compiled:
                    raise
                log(f"fast decode: torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                    "using the eager step")
                self.compiled = False
                self._use_pieces(compiled=False)
                self._step()
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)

    def _capture(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        return graph

    @torch.inference_mode()
    def prefill(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                uniforms: torch.Tensor | None = None) -> None:
        """Run the prompt [B, T] (left-padded where attention_mask [B, T] is 0) and pick its first new token;
        with sampling, uniforms [B, n] are the draws for the next n tokens (n <= max_length - T)."""
        batch, length = input_ids.shape
        if batch != self.batch_size or length >= self.max_length:
            raise ValueError(f"prompt {tuple(input_ids.shape)} does not fit batch {self.batch_size}, "
                             f"max length {self.max_length}")
        self._reset()
        for projections in self.projections:
            for fused in projections.fused():
                fused.refresh()
        if uniforms is not None:
            self.uniforms[:, length : length + uniforms.shape[1]] = uniforms
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        for cache, layer in zip(self.layer_caches, out.past_key_values.layers):
            if isinstance(cache, WindowMemorySlots):
                _fill_slots_from(cache.window, layer.window, mask)
                _copy_state(cache.memory, layer.memory)
            elif isinstance(cache, AttentionSlots):
                _fill_slots_from(cache, layer, mask)
            else:
                _copy_state(cache, layer)
        chosen = choose_tokens(out.logits[:, -1], self.uniforms[:, length], self.sampling)  # [B, 1]
        self.tokens[:, :length] = input_ids
        self.tokens[:, length : length + 1] = chosen
        self._next_token.copy_(chosen)
        self._position.copy_(mask.sum(-1))
        self._index.fill_(length)

    @torch.inference_mode()
    def decode(self, steps: int) -> None:
        """Run `steps` decode steps after prefill (the first new token came from prefill)."""
        for _ in range(steps):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step()

    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 uniforms: torch.Tensor | None = None) -> torch.LongTensor:
        """[B, T] -> [B, T + max_new_tokens], the same tokens as greedy `model.generate()` with no eos stop
        (with sampling: drawn with uniforms [B, max_new_tokens], one per new token)."""
        length = input_ids.shape[1]
        if length + max_new_tokens > self.max_length:
            raise ValueError(f"{length} + {max_new_tokens} tokens exceed max length {self.max_length}")
        if not self.sampling.greedy and (uniforms is None or uniforms.shape != (self.batch_size, max_new_tokens)):
            raise ValueError(f"sampling needs uniforms of shape {(self.batch_size, max_new_tokens)}")
        self.prefill(input_ids, attention_mask, uniforms)
        self.decode(max_new_tokens - 1)
        return self.tokens[:, : length + max_new_tokens].clone()


def _fill_slots_from(slots: AttentionSlots, layer, mask: torch.Tensor) -> None:
    """Copy an attention layer cache's prefill K/V into the slots; mask [B, T] is the prompt's (0 at left padding)."""
    length = mask.shape[1]
    if isinstance(layer, SinkWindowLayer):  # it says which stream indices it kept
        key_slots = layer.slots
    else:  # the other caches keep the prompt's last tokens
        key_slots = torch.arange(length - layer.keys.shape[2], length, device=mask.device)
    _fill_slots(slots, layer.keys, layer.values, key_slots, mask)


def _copy_state(cache: RecurrentLayerCache, prefilled: RecurrentLayerCache) -> None:
    cache.conv_state.copy_(prefilled.conv_state)
    cache.recurrent_state.copy_(prefilled.recurrent_state)
    for kept, filled in zip(cache.pending or [], prefilled.pending or [], strict=True):
        kept.copy_(filled)


def _fill_slots(slots: AttentionSlots, keys: torch.Tensor, values: torch.Tensor, key_slots: torch.Tensor,
                mask: torch.Tensor) -> None:
    """Copy prefill K/V [B, Hkv, n, D] of the prompt's stream indices key_slots [n] into their ring slots, and each
    row's first `sinks` real tokens into its sink slots; mask [B, T] is the prompt's (0 at left padding). The shared
    masks get the same values from every layer of their shape."""
    masks = slots.masks
    last = mask.shape[1] - 1  # the ring now holds stream indices (last - ring, last]
    in_ring = key_slots > last - masks.ring  # [n]
    index = key_slots[in_ring]
    where = index % masks.ring
    slots.keys[:, :, where] = keys[:, :, in_ring]
    slots.values[:, :, where] = values[:, :, in_ring]
    masks.valid[:, where] = mask[:, index]
    if masks.sinks:
        rank = real_token_rank(mask)[:, key_slots]  # [B, n]
        rows, cols = ((rank < masks.sinks) & mask[:, key_slots]).nonzero(as_tuple=True)
        sink = rank[rows, cols]
        slots.keys[rows, :, masks.ring + sink] = keys[rows, :, cols]
        slots.values[rows, :, masks.ring + sink] = values[rows, :, cols]
        masks.sink_index[rows, sink] = key_slots[cols]
        _update_sink_validity(masks, last)


def _admit_token(masks: SlotMasks, index: torch.Tensor, position: torch.Tensor) -> None:
    """Before a step's layers attend: the step's token (stream index `index`, its row's position-th real token) goes
    to ring slot `slot`, which becomes valid; if it is among its row's first `sinks` real tokens it also goes to that
    row's `sink_slot` and is noted as a sink; sinks whose token has left the ring become valid. Once for all the
    layers sharing these masks; each layer's rope_store then writes its K/V to those slots. Written for every row
    with a where(), so the step stays one static graph."""
    masks.slot.copy_((index % masks.ring).view(1))
    masks.valid.index_fill_(1, masks.slot, True)
    if masks.sinks:
        rows = torch.arange(position.shape[0], device=position.device)
        is_sink = position < masks.sinks  # [B]
        sink = position.clamp(max=masks.sinks - 1)  # [B]
        masks.sink_slot.copy_(torch.where(is_sink, masks.ring + sink, -1))
        masks.sink_index[rows, sink] = torch.where(is_sink, index, masks.sink_index[rows, sink])
        _update_sink_validity(masks, index)


def _update_sink_validity(masks: SlotMasks, index) -> None:
    """A sink slot is seen only once its token has left the ring (stream index <= index - ring): never twice."""
    masks.valid[:, masks.ring : masks.ring + masks.sinks] = masks.sink_index <= index - masks.ring


def _segment(decoder, joined, between, fork, hidden, mixed, cos, sin):
    """One segment of StaticDecoder._step. Without `joined` it starts the step (`decoder._start_step`); otherwise it
    finishes that two-branch layer (layer, projections): its branches' outputs `mixed` combined, then its MLP. Then the
    layers of `between` ((layer, projections, cache) each, none with two branches). Then, with `fork` (layer,
    projections), that layer's input norm and joined projection, returned for its branches as (hidden, cos, sin, x,
    window part, memory part); without, the step's end (`decoder._end_step`)."""
    if joined is None:
        hidden, cos, sin = decoder._start_step()
    else:
        layer, projections = joined
        hidden = _mlp_half(layer, projections, hidden, layer.mixer.combine(*mixed))
    for layer, projections, cache in between:
        x = layer.input_layernorm(hidden)
        projected = _projected(projections.mixer, x)
        if isinstance(cache, AttentionSlots):
            mixed = _attention_step(layer.mixer, x, cos, sin, cache, projected)
        else:
            mixed = layer.mixer(x, _recurrent_context(cos, sin), cache, projected=projected)
        hidden = _mlp_half(layer, projections, hidden, mixed)
    if fork is None:
        decoder._end_step(hidden)
        return None
    layer, projections = fork
    x = layer.input_layernorm(hidden)
    projected = _projected(projections.mixer, x)
    split = projections.window_groups
    window_part, memory_part = (projected[:split], projected[split:]) if projected else (None, None)
    return hidden, cos, sin, x, window_part, memory_part


def _mlp_half(layer, projections: LayerProjections, hidden: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """A layer after its mixer: the residual add, the post-attention norm, the MLP and its residual add."""
    hidden = hidden + mixed
    x = layer.post_attention_layernorm(hidden)
    return hidden + layer.mlp(x, projected=_projected(projections.mlp, x))


def _window_branch(mixer, slots: AttentionSlots, x: torch.Tensor, cos, sin, window_part) -> torch.Tensor:
    return _attention_step(mixer.window, x, cos, sin, slots, window_part)


def _memory_branch(mixer, cache: RecurrentLayerCache, x: torch.Tensor, cos, sin, memory_part) -> torch.Tensor:
    return mixer.memory(x, _recurrent_context(cos, sin), cache, projected=memory_part)


def _recurrent_context(cos: torch.Tensor, sin: torch.Tensor) -> SequenceContext:
    """What a recurrent mixer's decode step reads: its position's RoPE tables (recurrent RoPE), no mask, no past."""
    return SequenceContext(position_embeddings=(cos, sin), attention_mask=None, past_tokens=0)


def _attention_step(attention, x: torch.Tensor, cos, sin, slots: AttentionSlots, projected=None) -> torch.Tensor:
    """One token of (sliding-window) attention against static slots: x [B, 1, C] -> [B, 1, C].

    The G query heads that share a KV head go in as G query rows of that head, so the kernel reads each
    cached K/V once instead of a G-times repeated copy; the mask depends on the key only, so this is exact.
    On a GPU the split-KV kernel spreads the slots over the SMs, and RoPE with the K/V writes to the slots _admit_token
    chose is one more launch (rope_store); on the CPU the fp32 references run.
    """
    batch = x.shape[0]
    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    q, k, v = projected if projected is not None else project(x, attention.input_groups)  # [B, 1, H*D], [B, 1, Hkv*D]
    q = ops.rope_store(q.view(batch, heads, dim), k.view(batch, kv_heads, dim), v.view(batch, kv_heads, dim),
                       cos[:, 0], sin[:, 0], slots.keys, slots.values, slots.masks.slot,
                       slots.masks.sink_slot)  # [B, H, D]
    grouped_q = q.view(batch, kv_heads, heads // kv_heads, dim)  # [B, Hkv, G, D]
    out = ops.decode_attention(grouped_q, slots.keys, slots.values, slots.masks.valid)  # [B, Hkv, G, D]
    return attention.o_proj(out.reshape(batch, 1, heads * dim))  # [B, 1, C]
