"""StaticDecoder gives generate()'s greedy tokens, with its static slots, ring buffers and in-place states."""

import collections
import copy
import math

import pytest
import torch
from torch import nn
from helpers import INTRA_LAYER_TYPES, intra_layer_options, open_mamba2_states, open_memory_branches, requires_cuda

from hybridize.kernels.decode_attention import store
from hybridize.model.fast_decode import StaticDecoder
from hybridize.model import HybridConfig, HybridForCausalLM

LAYERS = ["mamba2", "full_attention", "gated_deltanet", "sliding_attention", "window_gated_deltanet", "mamba2",
          "window_mamba2", "full_attention", "headwise_gated_deltanet", "headwise_mamba2"]


def _model(layer_types=LAYERS, window=8, dtype=torch.float32, device="cpu", sinks=0, memory_outside_window=False,
           **options):
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
                          num_attention_heads=4, num_key_value_heads=2, layer_types=layer_types, sliding_window=window,
                          sliding_window_sinks=sinks, max_position_embeddings=256, conv_kernel_size=4,
                          memory_outside_window=memory_outside_window, **options)
    model = HybridForCausalLM(config)
    open_mamba2_states(model)  # so that the decoder's in-place Mamba2 states decide the tokens
    return model.to(device=device, dtype=dtype).eval()


def _reference(model, ids, new_tokens, attention_mask=None):
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("sinks", [0, 1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_same_tokens_as_generate(padded, sinks):
    """17 prompt + 24 new tokens: the 8-token sliding window wraps its ring several times. Row 1 has 15 pads, so
    with sinks its second and third sink tokens arrive during decoding."""
    model = _model(sinks=sinks)
    ids = torch.randint(1, 128, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :16] = 0
        mask[2, :1] = 0
    decoder = StaticDecoder(model, batch_size=3, max_length=48)
    assert torch.equal(decoder.generate(ids, 24, attention_mask=mask), _reference(model, ids, 24, mask))


# Model options the decoder has to follow, each with the model that exercises it.
DECODE_OPTIONS = {
    # each memory's last `window` inputs kept in static buffers, the oldest written into the state at every step
    "memory_outside_window": dict(layer_types=["window_gated_deltanet", "full_attention", "window_mamba2"],
                                  memory_outside_window=True),
    # every kind of recurrent mixer rotating by RoPE: each step's position handed to them too
    "recurrent_rope": dict(recurrent_rope=True),
}


@pytest.mark.parametrize("option", sorted(DECODE_OPTIONS))
@pytest.mark.parametrize("padded", [False, True])
def test_model_options_decode_as_generate(padded, option):
    """The same tokens as generate(), 24 new ones: the 8-token window wraps several times."""
    model = _model(**DECODE_OPTIONS[option])
    ids = torch.randint(1, 128, (2, 13), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :6] = 0
    decoder = StaticDecoder(model, batch_size=2, max_length=40)
    assert torch.equal(decoder.generate(ids, 24, attention_mask=mask), _reference(model, ids, 24, mask))


@pytest.mark.parametrize("kind", ["headwise_gated_deltanet", "headwise_mamba2"])
@pytest.mark.parametrize("headwise_window", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_headwise_layers_decode_as_generate(padded, headwise_window, kind):
    """Head-wise layers (one KV head's attention, the other's query heads as GDN or Mamba2 heads): their attention
    heads' slots (the whole sequence, or an 8-token window with 2 sinks wrapping its ring) and their recurrent heads'
    state give generate()'s tokens."""
    model = _model([kind, "full_attention", kind], sinks=2, headwise_window=headwise_window,
                   headwise_kv_heads={"2": [1]})
    ids = torch.randint(1, 128, (2, 13), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :6] = 0
    decoder = StaticDecoder(model, batch_size=2, max_length=40)
    assert torch.equal(decoder.generate(ids, 24, attention_mask=mask), _reference(model, ids, 24, mask))


@pytest.mark.parametrize("kind", ["headwise_gated_deltanet", "headwise_mamba2"])
def test_headwise_layers_cache_only_their_attention_heads_keys(kind):
    """A head-wise layer keeping 1 of 2 KV heads holds half the K/V slots a full-attention layer holds, plus its
    recurrent heads' state (2 GDN or Mamba2 heads of head dim 16: the other KV head's query heads); the two layers'
    slots have one shape, so they share one validity mask."""
    model = _model(["full_attention", kind])
    decoder = StaticDecoder(model, 2, 40)
    config, slots = model.config, 40
    kv = 2 * 2 * config.head_dim * 4 * slots  # K and V of one KV head, batch 2, fp32
    recurrent = model.model.layers[1].mixer.memory
    assert recurrent.state_shape == (2, 16, 16)
    assert sum(recurrent.conv_channels) == 3 * 2 * 16  # q, k, v (x, B, C) of 2 heads
    state = 2 * (math.prod(recurrent.state_shape) * 4 + sum(recurrent.conv_channels) * 3 * 4)
    valid = 2 * slots  # one validity mask for both layers' full-length slots
    assert decoder.cache_nbytes() == 2 * kv + kv + valid + state


def test_decoder_is_reusable():
    """A second prompt on the same decoder ignores everything the first one left in the buffers."""
    model = _model()
    gen = torch.Generator().manual_seed(2)
    first, second = torch.randint(1, 128, (2, 20), generator=gen), torch.randint(1, 128, (2, 9), generator=gen)
    decoder = StaticDecoder(model, batch_size=2, max_length=40)
    decoder.generate(first, 12)
    assert torch.equal(decoder.generate(second, 12), _reference(model, second, 12))


def test_a_decoder_built_once_follows_weights_changed_in_place():
    """Each prefill re-reads the weights (on-policy distillation decodes with one decoder while training the model):
    after an in-place change, the tokens are those of the changed model's generate(), not the old ones."""
    model = _model()
    ids = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(4))
    decoder = StaticDecoder(model, batch_size=2, max_length=40)
    before = decoder.generate(ids, 16)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5 * param.std().nan_to_num() * torch.randn_like(param))
    after = decoder.generate(ids, 16)
    assert not torch.equal(after, before), "the change must move the tokens, or this test shows nothing"
    assert torch.equal(after, _reference(model, ids, 16))


def test_each_layer_projects_its_inputs_in_one_gemm():
    """In a decode step no input projection runs as its own module: each layer's (a window + memory or head-wise
    layer's both branches' together) and its MLP's gate and up are one GEMM over concatenated weights. The output
    projections still run as the model's modules."""
    model = _model()
    calls = collections.Counter()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda module, args, out, name=name: calls.update([name.split(".")[-1]]))
    decoder = StaticDecoder(model, batch_size=2, max_length=40)
    decoder.prefill(torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3)))
    calls.clear()
    decoder.decode(3)
    assert set(calls) == {"o_proj", "out_proj", "down_proj", "lm_head"}  # output projections only
    assert calls["down_proj"] == 3 * len(LAYERS) and calls["lm_head"] == 3


def test_the_triton_kernels_decode_as_the_references(monkeypatch):
    """Every kernel the decoder calls (prefill's chunked ones; the step's conv, GDN and SSD steps, gated norm, RoPE
    with the slot writes, split-KV attention) on its Triton path, interpreted: the tokens of the references. The step
    hands the kernels views of its joined projections with their own batch strides, and shared write slots; a kernel
    that misread either would change the tokens."""
    model = _model(["window_gated_deltanet", "sliding_attention", "window_mamba2", "gated_deltanet", "mamba2"],
                   sinks=2)
    ids = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0  # one real token: its row's second sink arrives while decoding
    reference = StaticDecoder(model, batch_size=2, max_length=24)
    want = reference.generate(ids, 10, attention_mask=mask)
    launches, launch = [], store._rope_store
    monkeypatch.setattr(store, "_rope_store", lambda *args: launches.append(1) or launch(*args))
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "triton")
    kernels = StaticDecoder(model, batch_size=2, max_length=24)
    assert torch.equal(kernels.generate(ids, 10, attention_mask=mask), want)
    assert len(launches) == (2 + 9) * 3  # (2 warm-up + 9 decode steps) x 3 attention layers (2 of them windows)
    # every slot and state the steps wrote, not only the argmax: fp32 kernels against fp32 references
    for got, expected in zip(kernels._cache_buffers(), reference._cache_buffers(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_cache_bytes():
    """Full attention holds max_length K/V slots (rounded up to 8), sliding attention its window; states are fixed."""
    model = _model(["full_attention", "sliding_attention", "gated_deltanet"], window=5)
    config = model.config
    small, large = StaticDecoder(model, 2, 40), StaticDecoder(model, 2, 80)
    kv = 2 * 2 * config.num_key_value_heads * config.head_dim * 4  # K and V, batch 2, fp32, per slot
    assert large.cache_nbytes() - small.cache_nbytes() == (kv + 2) * 40  # + one validity byte per slot and row
    gdn = model.model.layers[2].mixer
    state = 2 * gdn.num_heads * gdn.head_k_dim * gdn.head_v_dim * 4 + 2 * sum(gdn.conv_channels) * 3 * 4
    valid = 2 * (40 + 8)  # one bool per slot and row
    assert small.cache_nbytes() == kv * (40 + 8) + state + valid


def test_window_memory_layers_hold_a_cache_that_does_not_grow_with_the_length():
    """A model of window + memory layers only (the constant-memory plan) keeps its window's slots and its memory's
    state: the same bytes for 40 and 400 tokens, and exactly what its window and memory need."""
    model = _model(["window_gated_deltanet", "window_mamba2"], window=5)
    small, large = StaticDecoder(model, 2, 40), StaticDecoder(model, 2, 400)
    assert small.cache_nbytes() == large.cache_nbytes()
    config, slots = model.config, 8  # the 5-token window rounded up to 8 slots
    window = 2 * 2 * config.num_key_value_heads * config.head_dim * 4 * slots  # K, V fp32, batch 2
    valid = 2 * slots  # one validity mask for both windows, of one shape
    memory = 0
    for layer in model.model.layers:
        mixer = layer.mixer.memory
        memory += 2 * (math.prod(mixer.state_shape) * 4 + sum(mixer.conv_channels) * 3 * 4)
    assert small.cache_nbytes() == 2 * window + valid + memory


def test_rejects_prompts_that_do_not_fit():
    decoder = StaticDecoder(_model(), batch_size=2, max_length=16)
    with pytest.raises(ValueError, match="exceed"):
        decoder.generate(torch.ones(2, 10, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="does not fit"):
        decoder.generate(torch.ones(3, 4, dtype=torch.long), 2)


def test_compiled_step_gives_the_same_tokens():
    """torch.compile traces the whole step (what runs on a GPU before capture) and changes no token."""
    model = _model(["mamba2", "full_attention", "gated_deltanet", "sliding_attention", "window_gated_deltanet"])
    ids = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(4))
    decoder = StaticDecoder(model, batch_size=2, max_length=32, compile_step=True, log=pytest.fail)
    assert decoder.compiled
    assert torch.equal(decoder.generate(ids, 16), _reference(model, ids, 16))


def test_compiled_pieces_serve_every_layer_and_decoder():
    """The step compiles as pieces between the two-branch layers' forks (docs/model.md): one graph per segment shape
    and per branch type, however many layers share it; a second decoder of the model compiles nothing new. Its
    tokens are generate()'s."""
    from torch._dynamo.utils import counters

    model = _model(["window_gated_deltanet"] * 5 + ["full_attention", "gated_deltanet", "headwise_gated_deltanet"],
                   headwise_kv_heads={"7": [0]})
    ids = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    counters.clear()
    decoder = StaticDecoder(model, batch_size=2, max_length=32, compile_step=True, log=pytest.fail)
    # segments: start -> fork 0; from one window + memory layer to the next (4 of them, one graph); layer 4 -> attention,
    # GDN -> fork 7; fork 7 -> end. Branches: window and memory, head-wise attention and memory.
    assert counters["stats"]["unique_graphs"] == 4 + 4
    assert torch.equal(decoder.generate(ids, 16), _reference(model, ids, 16))
    StaticDecoder(model, batch_size=2, max_length=32, compile_step=True, log=pytest.fail)
    assert counters["stats"]["unique_graphs"] == 4 + 4, "the second decoder reuses every piece"


def test_compiled_step_around_the_triton_kernels_picks_greedy_tokens(monkeypatch):
    """The step compiled around the Triton kernels' ops, as on a GPU (here the interpreter runs them), for every layer
    type with sink windows: each token it picks is the argmax of one uncached forward, up to fp32 rounding."""
    model = _model(sinks=2)
    ids = torch.randint(1, 128, (4, 33), generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("HYBRIDIZE_KERNELS", "triton")
    tokens = StaticDecoder(model, batch_size=4, max_length=64, compile_step=True, log=pytest.fail).generate(ids, 24)
    monkeypatch.delenv("HYBRIDIZE_KERNELS")
    _assert_near_greedy(model, tokens, 33, 0.01)


def _assert_near_greedy(model, tokens: torch.Tensor, prompt: int, tolerance: float,
                        prompt_mask: torch.Tensor | None = None) -> None:
    """Each generated token is the argmax, up to `tolerance` x the logits' spread, of one uncached forward over the
    same tokens (prompt_mask [B, prompt]: 0 at left padding). Greedy trajectories cannot be compared once rounding
    flips a near-tie (the rows then go different ways), but every single choice can: a wrong cache slot or state
    picks tokens far below the top. The forward runs on the CPU, where the windows take SDPA with a dense mask and
    the recurrent layers the PyTorch references: a GPU decoder is checked against other code than its own, and not
    against Inductor's flex attention, whose lowering fails at this model's head dim of 16 on an H100
    (NoValidChoicesError; flex attention has CUDA tests of its own)."""
    mask = None
    if prompt_mask is not None:
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(tokens.shape[0], tokens.shape[1] - prompt)], 1).cpu()
    reference = model if tokens.device.type == "cpu" else copy.deepcopy(model).cpu()
    with torch.no_grad():
        logits = reference(input_ids=tokens.cpu(), attention_mask=mask, use_cache=False).logits
    logits = logits[:, prompt - 1 : -1].float()
    tokens = tokens.cpu()
    chosen = logits.gather(-1, tokens[:, prompt:, None])[..., 0]  # [B, new]
    top, spread = logits.amax(-1), logits.amax(-1) - logits.amin(-1)
    shortfall = ((top - chosen) / spread).max().item()
    assert shortfall <= tolerance, f"a chosen token is {shortfall:.3f} of the logit spread below the argmax"


@requires_cuda
@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("compile_step", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_matches_eager(dtype, compile_step, sinks):
    """The captured step replays what the eager step computes; compiled, it picks greedy tokens up to rounding."""
    model = _model(device="cuda", dtype=dtype, sinks=sinks)
    ids = torch.randint(1, 128, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    graphed = StaticDecoder(model, 4, 96, compile_step=compile_step, log=pytest.fail)
    assert graphed.use_cuda_graph and graphed.compiled == compile_step
    tokens = graphed.generate(ids, 48)
    if compile_step:  # fused kernels round differently
        _assert_near_greedy(model, tokens, 33, 0.01 if dtype == torch.float32 else 0.03)
    else:
        eager = StaticDecoder(model, 4, 96, use_cuda_graph=False, compile_step=False).generate(ids, 48)
        assert torch.equal(tokens, eager)
    if dtype == torch.float32:
        assert (tokens == _reference(model, ids, 48)).float().mean() > 0.9


@requires_cuda
@pytest.mark.parametrize("compile_step", [False, True])
@pytest.mark.parametrize("windowed", [False, True], ids=["memory_all_tokens", "windowed"])
@pytest.mark.parametrize("kind", INTRA_LAYER_TYPES)
def test_cuda_graph_decodes_intra_layer_types_as_generate_in_bf16(kind, windowed, compile_step):
    """4 left-padded rows in bf16, 31 new tokens past an 8-token window with 2 sinks (row 1's second sink arrives
    while decoding), memory states that reach the output: the captured step, with its ring slots, sink slots,
    memory state and (windowed) pending memory writes, replays exactly what the eager step computes; compiled, it
    has no graph break. It and generate() choose every token within bf16 rounding of the argmax of one uncached
    forward, so their greedy tokens can part only at a near-tie."""
    layer_types = [kind, "full_attention", kind]
    model = _model(layer_types, device="cuda", dtype=torch.bfloat16, sinks=2,
                   **intra_layer_options(layer_types, windowed, kv_heads=2))
    open_memory_branches(model)
    ids = torch.randint(1, 128, (4, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :16] = 0
    mask[2, :1] = 0
    mask[3, :7] = 0
    torch._dynamo.utils.counters.clear()
    graphed = StaticDecoder(model, 4, 48, compile_step=compile_step, log=pytest.fail)
    assert graphed.use_cuda_graph and graphed.compiled == compile_step
    assert not torch._dynamo.utils.counters["graph_break"]
    tokens = graphed.generate(ids, 31, attention_mask=mask)
    if not compile_step:  # the same kernels, launched by a replay instead of Python
        eager = StaticDecoder(model, 4, 48, use_cuda_graph=False, compile_step=False)
        assert torch.equal(tokens, eager.generate(ids, 31, attention_mask=mask))
    _assert_near_greedy(model, _reference(model, ids, 31, mask), 17, 0.03, mask)  # the check holds for generate()
    _assert_near_greedy(model, tokens, 17, 0.03, mask)


def test_near_greedy_check_accepts_greedy_tokens_and_catches_others():
    """The CUDA test's check, on the CPU: generate()'s own tokens pass; the same tokens with one step's choice
    replaced by the runner-up's runner-up fail."""
    model = _model()
    ids = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    tokens = _reference(model, ids, 16)
    _assert_near_greedy(model, tokens, 11, 1e-6)
    with torch.no_grad():
        logits = model(input_ids=tokens, use_cache=False).logits[0, 15]  # chooses tokens[0, 16]
    wrong = tokens.clone()
    wrong[0, 16] = logits.argsort(descending=True)[2]
    with pytest.raises(AssertionError, match="below the argmax"):
        _assert_near_greedy(model, wrong, 11, 0.03)
