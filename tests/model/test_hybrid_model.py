"""HybridForCausalLM: cache paths agree with the full forward, padding is invisible, save/load is exact, configs validate."""

import pytest
import torch
from helpers import open_mamba2_states
from transformers import AutoConfig, AutoModelForCausalLM

from hybridize.model import HybridCache, HybridConfig, HybridConfigError, HybridForCausalLM

MIXED = ["mamba2", "full_attention", "gated_deltanet", "sliding_attention"]
PLANS = {
    "full_attention": ["full_attention"] * 2,
    "sliding_attention": ["sliding_attention"] * 2,
    "mamba2": ["mamba2"] * 2,
    "gated_deltanet": ["gated_deltanet"] * 2,
    "window_gated_deltanet": ["window_gated_deltanet"] * 2,
    "window_mamba2": ["window_mamba2"] * 2,
    "window_outside": ["window_gated_deltanet", "window_mamba2"],  # memories that read what has left the window
    "headwise_gated_deltanet": ["headwise_gated_deltanet"] * 2,
    "headwise_window": ["headwise_gated_deltanet", "full_attention", "headwise_gated_deltanet"],
    "headwise_mamba2": ["headwise_mamba2"] * 2,
    "headwise_mamba2_window": ["headwise_mamba2", "full_attention", "headwise_mamba2"],
    "mixed": MIXED,
    "recurrent_rope": ["gated_deltanet", "mamba2"],  # q, k and C, B rotated by RoPE
    "recurrent_rope_branches": ["window_gated_deltanet", "headwise_mamba2"],
}
# attention heads in windows with sinks; the last layer keeps its second KV head, not the first
HEADWISE_WINDOW = dict(headwise_window=True, sliding_window_sinks=2, headwise_kv_heads={"2": [1]})
PLAN_OPTIONS = {"window_outside": dict(memory_outside_window=True), "headwise_window": HEADWISE_WINDOW,
                "headwise_mamba2_window": HEADWISE_WINDOW, "recurrent_rope": dict(recurrent_rope=True),
                "recurrent_rope_branches": dict(recurrent_rope=True, memory_outside_window=True)}


# The model runs in fp64, but recurrent states are kept in fp32 by design (what the kernels do), so cached
# paths agree with the full forward to fp32 precision of the state, not to fp64 round-off.
CLOSE = dict(atol=1e-6, rtol=1e-5)


def tiny_hybrid(layer_types, seed: int = 0, **options) -> HybridForCausalLM:
    torch.manual_seed(seed)
    config = HybridConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=layer_types,
        sliding_window=16, mamba_chunk_size=16, gdn_chunk_size=16, max_position_embeddings=512, **options,
    )
    model = HybridForCausalLM(config)
    open_mamba2_states(model)  # so that the cache paths' Mamba2 states decide the logits
    return model.double().eval()


def full_logits(model, input_ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("length", [1, 63, 75])
def test_token_by_token_decode_equals_full_forward(plan, length):
    model = tiny_hybrid(PLANS[plan], **PLAN_OPTIONS.get(plan, {}))
    input_ids = torch.randint(0, 97, (2, length))
    expected = full_logits(model, input_ids)
    cache = HybridCache(model.config)
    with torch.no_grad():
        steps = [model(input_ids[:, t : t + 1], past_key_values=cache).logits for t in range(length)]
    torch.testing.assert_close(torch.cat(steps, 1), expected, **CLOSE)
    assert cache.get_seq_length() == length


def test_bf16_model_runs_on_the_cpu_and_tracks_fp32():
    """Every mixer keeps the model's dtype on the reference path (a bf16 hybrid on a CPU), close to its fp32 copy."""
    model = tiny_hybrid(MIXED)
    input_ids = torch.randint(0, 97, (2, 40))
    expected = full_logits(model.float(), input_ids)
    actual = full_logits(model.bfloat16(), input_ids)
    assert actual.dtype == torch.bfloat16
    rel = (actual.float() - expected).norm() / expected.norm()
    assert rel < 0.03, f"bf16 logits are {rel:.3f} (relative RMS) from fp32"


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_bf16_autocast_tracks_fp32(plan):
    """Mixed-precision training: fp32 weights under bf16 autocast, where q, k, v come bf16 from the projections and
    RoPE's cos and sin stay fp32 (so rotated q, k must be put back in v's dtype: the recurrences need one dtype)."""
    model = tiny_hybrid(PLANS[plan], **PLAN_OPTIONS.get(plan, {})).float()
    input_ids = torch.randint(0, 97, (2, 40))
    expected = full_logits(model, input_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = full_logits(model, input_ids)
    rel = (actual.float() - expected).norm() / expected.norm()
    assert rel < 0.03, f"bf16-autocast logits are {rel:.3f} (relative RMS) from fp32"


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_chunked_prefill_then_decode_equals_full_forward(plan):
    model = tiny_hybrid(PLANS[plan], **PLAN_OPTIONS.get(plan, {}))
    input_ids = torch.randint(0, 97, (2, 200))
    expected = full_logits(model, input_ids)
    cache = HybridCache(model.config)
    with torch.no_grad():
        pieces = [model(input_ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 63), (63, 138), (138, 195))]
        pieces += [model(input_ids[:, t : t + 1], past_key_values=cache).logits for t in range(195, 200)]
    torch.testing.assert_close(torch.cat(pieces, 1), expected, **CLOSE)


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_left_padded_batch_equals_each_sequence_alone(plan):
    model = tiny_hybrid(PLANS[plan], **PLAN_OPTIONS.get(plan, {}))
    lengths = [75, 63, 40]
    sequences = [torch.randint(0, 97, (n,)) for n in lengths]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):], mask[row, width - len(seq):] = seq, 1
    batched = full_logits(model, input_ids, mask)
    for row, seq in enumerate(sequences):
        alone = full_logits(model, seq[None])
        torch.testing.assert_close(batched[row, width - len(seq):], alone[0], **CLOSE)


@pytest.mark.parametrize("plan", ["mixed", "mamba2", "window_gated_deltanet", "headwise_window",
                                  "headwise_mamba2_window", "recurrent_rope"])
def test_generate_greedy_with_cache_equals_without_and_handles_padding(plan):
    model = tiny_hybrid(PLANS[plan], **PLAN_OPTIONS.get(plan, {}))
    prompt = torch.randint(3, 97, (1, 21))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(prompt, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
        padded = model.generate(torch.cat([torch.zeros(1, 5, dtype=torch.long), prompt], 1),
                                attention_mask=torch.cat([torch.zeros(1, 5), torch.ones(1, 21)], 1).long(), **kwargs)
    assert cached.shape == (1, 33)
    assert torch.equal(cached, uncached)
    assert torch.equal(padded[:, 5:], cached)


@pytest.mark.parametrize("kind", ["gated_deltanet", "mamba2", "window_gated_deltanet", "headwise_mamba2"])
def test_recurrent_rope_sees_only_distances_between_positions(kind):
    """q and k (C and B) rotated at their own positions meet in dot products that depend on the distance between the
    positions alone, and the delta rule's updates are rotated alike: shifting every position by 7 changes no logit.
    The rotation is there all the same: the logits differ from those of the same weights without it, except at the
    first token, which only meets itself."""
    rotated = tiny_hybrid([kind] * 2, recurrent_rope=True)
    plain = tiny_hybrid([kind] * 2)
    plain.load_state_dict(rotated.state_dict())
    input_ids = torch.randint(0, 97, (2, 40))
    positions = torch.arange(40)[None].expand(2, -1)
    with torch.no_grad():
        logits = rotated(input_ids, position_ids=positions, use_cache=False).logits
        shifted = rotated(input_ids, position_ids=positions + 7, use_cache=False).logits
        unrotated = plain(input_ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(shifted, logits, **CLOSE)
    torch.testing.assert_close(unrotated[:, 0], logits[:, 0], **CLOSE)
    assert (unrotated[:, 1:] - logits[:, 1:]).abs().max() > 1e-3


def test_generate_sampling_is_seeded_and_in_vocab():
    model = tiny_hybrid(MIXED)
    prompt = torch.randint(3, 97, (3, 9))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            runs.append(model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0,
                                       eos_token_id=None))
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (3, 17) and int(runs[0].max()) < 97


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = tiny_hybrid(MIXED).float()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, HybridForCausalLM)
    assert loaded.config.layer_types == MIXED
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    input_ids = torch.randint(0, 97, (1, 30))
    assert torch.equal(full_logits(model, input_ids), full_logits(loaded, input_ids))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(layer_types=["full_attention", "lstm"]), "layer_types[1] is 'lstm'; allowed values: full_attention"),
        (dict(layer_types=["mamba2"]), "layer_types has 1 entries but num_hidden_layers is 2"),
        (dict(mamba_num_groups=3), "mamba_num_groups must divide mamba_num_heads"),
        (dict(conv_kernel_size=7), "conv_kernel_size must be in 2..4"),
        (dict(gdn_chunk_size=48), "gdn_chunk_size allowed values: 16, 32, 64, 128"),
        (dict(layer_types=["headwise_gated_deltanet"] * 2, headwise_kv_heads={"0": [0, 1]}),
         "headwise_kv_heads of layer 0 must be distinct KV heads in 0..1, at least one and not all 2"),
        (dict(layer_types=["headwise_gated_deltanet"] * 2, headwise_kv_heads={"1": [2]}),
         "headwise_kv_heads of layer 1 must be distinct KV heads in 0..1"),
        (dict(headwise_kv_heads={"1": [0]}), "headwise_kv_heads names layer '1', which is not a headwise layer"),
        (dict(layer_types=["headwise_gated_deltanet"] * 2, num_key_value_heads=1),
         "at least one and not all 1 (got [0])"),
        (dict(layer_types=["window_gated_deltanet"] * 2, recurrent_rope=True, gdn_head_k_dim=8),
         "gdn_head_k_dim must equal head_dim (16) for recurrent_rope, got 8"),
        (dict(recurrent_rope=True, mamba_state_size=32), "mamba_state_size must equal head_dim (16) for recurrent_rope"),
    ],
)
def test_malformed_config_names_the_field(fields, message):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, layer_types=["mamba2", "full_attention"])
    with pytest.raises(HybridConfigError) as err:
        HybridConfig(**{**base, **fields})
    assert message in str(err.value)


def test_malformed_config_file_is_refused(tmp_path):
    tiny_hybrid(MIXED).config.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"gated_deltanet"', '"gated_deltanett"')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(Exception, match="gated_deltanett"):
        AutoConfig.from_pretrained(tmp_path)
