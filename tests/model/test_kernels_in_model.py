"""On a GPU the model runs the Triton kernels; it must agree with the CPU reference path and train the same way.
On the CPU the intra-layer types run on the same kernels, interpreted, against the references."""

import contextlib
import copy

import pytest
import torch
from helpers import INTRA_LAYER_TYPES, assert_rel_rmse, intra_layer_model, rel_rmse, requires_cuda

from hybridize.kernels import conv1d, gated_delta, norm, ssd
from hybridize.model import HybridCache, HybridConfig, HybridForCausalLM
from hybridize.model.configuration_hybrid import BRANCH_TYPES, WINDOW_MEMORY_TYPES

PLAN = ["mamba2", "full_attention", "gated_deltanet", "sliding_attention", "mamba2", "gated_deltanet"]


def model_pair():
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=len(PLAN),
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, layer_types=PLAN,
                          sliding_window=64, max_position_embeddings=1024)
    cpu = HybridForCausalLM(config)
    gpu = HybridForCausalLM(config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@requires_cuda
def test_cuda_kernels_match_reference_forward_in_bf16():
    cpu, gpu = model_pair()
    ids = torch.randint(0, 512, (2, 300))
    with torch.no_grad():
        expected = cpu(ids, use_cache=False).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            actual = gpu(ids.cuda(), use_cache=False).logits.float().cpu()
    assert torch.isfinite(actual).all()
    assert rel_rmse(actual, expected) < 2e-2


@requires_cuda
def test_cuda_training_tracks_reference_loss():
    cpu, gpu = model_pair()
    ids = torch.randint(0, 512, (4, 256))
    losses = {}
    for name, model, batch in (("cpu", cpu, ids), ("gpu", gpu, ids.cuda())):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for _ in range(6):
            loss = model(batch, labels=batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["gpu"][-1] < losses["gpu"][0] - 0.05
    for a, b in zip(losses["cpu"], losses["gpu"]):
        assert abs(a - b) / a < 0.02, losses


# The Triton function behind each op the model calls: (op package, its Triton module, function name).
TRITON_FUNCTIONS = [(gated_delta, "chunk", "chunk_gated_delta_rule"), (gated_delta, "recurrent", "gated_delta_step"),
                    (gated_delta, "layer_step", "gated_delta_layer_step"), (ssd, "layer_step", "ssd_layer_step"),
                    (ssd, "chunk", "chunk_ssd"), (ssd, "recurrent", "ssd_step"), (conv1d, "chunk", "causal_conv1d"),
                    (conv1d, "recurrent", "causal_conv1d_step"), (norm, "chunk", "gated_rms_norm")]
# The chunked kernel of each recurrent mixer and its decode step's kernels; every such mixer also runs the conv and
# the norm. A decode step is one launch (conv, recurrence and norm), unless the memory's writes wait outside a window.
CHUNK_KERNELS = {"gated_deltanet": "chunk_gated_delta_rule", "mamba2": "chunk_ssd"}
STEP_KERNELS = {"gated_deltanet": {"gated_delta_layer_step"}, "mamba2": {"ssd_layer_step"}}
DELAYED_STEP_KERNELS = {"gated_deltanet": {"causal_conv1d_step", "gated_delta_step"},
                        "mamba2": {"causal_conv1d_step", "ssd_step"}}
FP32_UNIT = 2.0**-24  # unit roundoff


@contextlib.contextmanager
def triton_kernels():
    """Within the block every op the model calls runs its Triton kernel on CPU tensors too (interpreted), where
    "auto" would pick the reference; yields the names of the Triton functions that ran."""
    ran = set()

    def recorded(function):
        def run(*args, **kwargs):
            ran.add(function.__name__)
            return function(*args, **kwargs)
        return run

    with pytest.MonkeyPatch.context() as patch:
        for package, module_name, name in TRITON_FUNCTIONS:
            patch.setattr(package, "resolve_backend", lambda backend, x: "triton")
            module = getattr(package, module_name)
            patch.setattr(module, name, recorded(getattr(module, name)))
        yield ran


def kernels_of(layer_types: list[str], decoding: bool, delayed: bool = False) -> set[str]:
    """The Triton functions a model of `layer_types` must run: chunked ones, plus the steps' when decoding (with
    `delayed`, window + memory layers whose memories write only what has left the window)."""
    chunked = {"causal_conv1d", "gated_rms_norm"} | {CHUNK_KERNELS[BRANCH_TYPES[kind]] for kind in layer_types}
    if not decoding:
        return chunked
    step_kernels = [DELAYED_STEP_KERNELS if delayed and kind in WINDOW_MEMORY_TYPES else STEP_KERNELS
                    for kind in layer_types]
    return chunked.union(*(kernels[BRANCH_TYPES[kind]] for kernels, kind in zip(step_kernels, layer_types)))


def assert_as_exact_as_the_reference(actual: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor,
                                     name: str) -> None:
    """`actual` (fp32 Triton) is about as far from `exact` (the fp64 reference) as `reference` (the fp32 one) is.

    Both evaluate the same math in fp32 in different summation orders, so each errs by the unit roundoff u times
    the quantity's conditioning, which the reference's own error measures: a few u for the logits, up to thousands
    of u for a per-head scalar (A_log, dt_bias, D) whose gradient sums every token's terms with much cancellation.
    Two evaluations of one conditioning differ by a small factor (4); the floor (32 u) covers a reference error
    that is small by luck. A kernel that reads or writes a wrong element misses by orders of magnitude more.
    """
    allowed = 4 * rel_rmse(reference, exact) + 32 * FP32_UNIT
    assert_rel_rmse(actual, exact, allowed, name)


def logits_and_gradients(model, input_ids, attention_mask) -> dict[str, torch.Tensor]:
    """The logits of the real tokens and every parameter's gradient of a fixed random linear loss of them."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits[attention_mask.bool()]
    cotangent = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (logits * cotangent.to(logits.dtype)).sum().backward()
    return {"logits": logits.detach(), **{name: p.grad for name, p in model.named_parameters()}}


def prefill_then_decode(model, input_ids, attention_mask, prefill: tuple[int, ...]) -> torch.Tensor:
    """Logits of the real tokens: the prompt in pieces ending at each `prefill` length, then one token a step."""
    cache = HybridCache(model.config)
    ends = [*prefill, *range(prefill[-1] + 1, input_ids.shape[1] + 1)]
    logits = []
    with torch.no_grad():
        for start, end in zip([0, *ends], ends):
            logits.append(model(input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                                past_key_values=cache).logits)
    return torch.cat(logits, 1)[attention_mask.bool()]


def padded_batch(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of `length` tokens, the second with 5 tokens of left padding."""
    input_ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("windowed", [False, True], ids=["memory_all_tokens", "windowed"])
def test_interpreted_kernels_train_intra_layer_types_as_the_references(windowed):
    """Logits and every gradient of a training forward (29 tokens: odd, two 16-token chunks, left padding)."""
    model = intra_layer_model(windowed)
    input_ids, attention_mask = padded_batch(29)
    reference = logits_and_gradients(model, input_ids, attention_mask)
    with triton_kernels() as ran:
        actual = logits_and_gradients(model, input_ids, attention_mask)
    assert ran == kernels_of(INTRA_LAYER_TYPES, decoding=False)
    exact = logits_and_gradients(copy.deepcopy(model).double(), input_ids, attention_mask)
    for name in exact:
        assert actual[name] is not None, f"{name}: no gradient on the kernels"
        assert_as_exact_as_the_reference(actual[name], reference[name], exact[name], name)


@pytest.mark.parametrize("windowed", [False, True], ids=["memory_all_tokens", "windowed"])
def test_interpreted_kernels_prefill_and_decode_intra_layer_types_as_the_references(windowed):
    """A padded prompt in two pieces (the second continues the conv windows, states and pending writes), then
    decode steps past the window."""
    model = intra_layer_model(windowed).eval()
    input_ids, attention_mask = padded_batch(31)
    reference = prefill_then_decode(model, input_ids, attention_mask, prefill=(13, 29))
    with triton_kernels() as ran:
        actual = prefill_then_decode(model, input_ids, attention_mask, prefill=(13, 29))
    assert ran == kernels_of(INTRA_LAYER_TYPES, decoding=True, delayed=windowed)
    exact = prefill_then_decode(copy.deepcopy(model).double(), input_ids, attention_mask, prefill=(13, 29))
    assert_as_exact_as_the_reference(actual, reference, exact, "logits")
