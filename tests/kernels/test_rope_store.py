"""The decode step's RoPE and slot writes (rope_store): the reference is transformers' RoPE and plain cache writes,
the Triton kernel (interpreted on the CPU) matches it within one rounding to the output dtype, and under torch.compile
its writes to the slots are kept."""

import pytest
import torch
from helpers import requires_cuda
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hybridize.kernels.decode_attention import reference, rope_store

B, H, HKV, S = 3, 4, 2, 11


def _inputs(D, dtype, device="cpu", seed=0):
    """q, k, v as views of one wider [B, N] row per sequence (as the step's joined projection gives them), cos and
    sin of positions 5, 17, 40, slots [B, Hkv, S, D] stored head-last-but-one (non-contiguous heads), the ring slot
    7, and sink slots: row 0 none, row 1 slot 9, row 2 slot 10."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(B, (H + 2 * HKV) * D + 5, generator=gen)
    q, k, v, _ = wide.split([H * D, HKV * D, HKV * D, 5], -1)
    q, k, v = (x.view(B, -1, D) for x in (q, k, v))  # [B, heads, D] with the wide batch stride
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    angles = torch.tensor([5.0, 17.0, 40.0])[:, None] * inv_freq  # [B, D/2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # [B, D]
    keys = torch.randn(B, S, HKV, D, generator=gen).transpose(1, 2)  # [B, Hkv, S, D], strided heads
    values = torch.randn(B, S, HKV, D, generator=gen).transpose(1, 2)
    slot, sink_slot = torch.tensor([7]), torch.tensor([-1, 9, 10])
    tensors = [q, k, v, cos, sin, keys, values, slot, sink_slot]
    return [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in tensors]


def test_reference_is_transformers_rope_and_plain_slot_writes():
    q, k, v, cos, sin, keys, values, slot, sink_slot = _inputs(16, torch.float32)
    expected_keys, expected_values = keys.clone(), values.clone()
    q_rot = reference.rope_store(q, k, v, cos, sin, keys, values, slot, sink_slot)
    q_hf, k_hf = apply_rotary_pos_emb(q[:, :, None], k[:, :, None], cos[:, None], sin[:, None])  # [B, H, 1, D]
    assert torch.equal(q_rot, q_hf[:, :, 0])
    expected_keys[:, :, 7], expected_values[:, :, 7] = k_hf[:, :, 0], v
    expected_keys[1, :, 9], expected_values[1, :, 9] = k_hf[1, :, 0], v[1]
    expected_keys[2, :, 10], expected_values[2, :, 10] = k_hf[2, :, 0], v[2]
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


@pytest.mark.parametrize("D", [16, 24])  # 24: a half of 12 in a 16-wide tile, the rest masked
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_the_reference_within_one_rounding(D, dtype):
    """Both compute the rotation in fp32 and round once to the dtype; fp32 sums in another order (or fused) differ by
    a few fp32 units, so outputs agree within one unit of the dtype's last place. Slots other than the ring and sink
    slots keep what they held."""
    inputs = _inputs(D, dtype)
    ref = [x.clone() for x in inputs]
    before = inputs[5].clone()
    q_rot = rope_store(*inputs, backend="triton")
    q_ref = reference.rope_store(*ref)
    eps = torch.finfo(dtype).eps
    for got, want in [(q_rot, q_ref), (inputs[5], ref[5]), (inputs[6], ref[6])]:
        torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=eps * 8)  # |x| < 8: one ulp at most
    untouched = torch.ones(B, S, dtype=torch.bool)
    untouched[:, 7], untouched[1, 9], untouched[2, 10] = False, False, False
    assert torch.equal(inputs[5].transpose(1, 2)[untouched], before.transpose(1, 2)[untouched])
    assert not torch.equal(inputs[5][:, :, 7], before[:, :, 7])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_compiled_call_keeps_the_slot_writes(device):
    """Under torch.compile the Triton launch is the opaque op hybridize::rope_store, whose schema declares its writes
    to keys and values: the compiled call writes the slots as the eager one does."""
    inputs = _inputs(16, torch.float32, device)
    eager = [x.clone() for x in inputs]
    compiled = torch.compile(lambda *args: rope_store(*args, backend="triton"), dynamic=False)
    with torch.inference_mode():
        got = compiled(*inputs)
        want = rope_store(*eager, backend="triton")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(inputs[5], eager[5])
    torch.testing.assert_close(inputs[6], eager[6])
    schema = str(torch.ops.hybridize.rope_store.default._schema)
    assert "Tensor(a5!) keys" in schema and "Tensor(a6!) values" in schema
