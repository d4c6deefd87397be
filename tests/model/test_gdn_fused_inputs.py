"""config.gdn_fused_inputs: the GDN layers hand raw q, k, a, b to the kernels, which form the norms, gate and beta;
the model computes what it computes with the layer forming them in PyTorch, outputs and every gradient."""

import pytest
import torch

from helpers import rel_rmse, requires_cuda
from hybridize.model import HybridCache, HybridConfig, HybridForCausalLM

PLAN = ["gated_deltanet", "full_attention", "gated_deltanet"]


def gdn_model(fused: bool, device: str = "cpu") -> HybridForCausalLM:
    """A small hybrid with GQA-shared q/k heads in its GDN layers; the same weights whatever `fused` is."""
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(PLAN),
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=PLAN,
                          gdn_num_k_heads=2, gdn_chunk_size=16, max_position_embeddings=512, gdn_fused_inputs=fused)
    model = HybridForCausalLM(config)
    with torch.no_grad():  # layer-like gates and write strengths, not the bare init's
        for layer in model.model.layers:
            mixer = getattr(layer, "mixer", None)
            if hasattr(mixer, "b_bias"):
                mixer.b_bias.normal_()
    return model.to(device)


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids, use_cache=False).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device=logits.device)).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_same_model(device, tol_logits, tol_grads, length):
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(1)).to(device)
    fused, unfused = gdn_model(True, device), gdn_model(False, device)
    assert fused.model.layers[0].mixer.fused_inputs and not unfused.model.layers[0].mixer.fused_inputs
    logits, grads = logits_and_grads(fused, ids)
    expected_logits, expected_grads = logits_and_grads(unfused, ids)
    assert rel_rmse(logits, expected_logits) <= tol_logits
    gdn_params = {"A_log", "dt_bias", "b_bias", "a_proj", "b_proj", "q_proj", "k_proj", "conv_weight"}
    assert any(part in name for name in grads for part in gdn_params)
    for name, grad in expected_grads.items():
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
        err = rel_rmse(grads[name], grad)
        assert err <= tol_grads, f"{name}: relative RMSE {err:.1e} > {tol_grads:.0e}"


def test_fused_inputs_match_the_layers_own_formulas():
    """On the PyTorch reference path, in fp32: the two forms differ by the order of fp32 roundings alone (the norm's
    rstd in fp32, not rounded to the input dtype first), a few eps through the layers' conditioning."""
    assert_same_model("cpu", 1e-5, 1e-4, length=37)


@pytest.mark.parametrize("fused", [True, False])
def test_cached_decoding_equals_full_forward(fused):
    """The decode step on raw inputs (one token at a time) continues the chunked prefill as the full forward does."""
    model = gdn_model(fused).eval()
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        cache = HybridCache(model.config)
        prefill = model(ids[:, :20], past_key_values=cache).logits
        steps = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(20, 30)]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), expected, atol=1e-5, rtol=1e-4)


def test_config_defaults_to_fused_and_round_trips(tmp_path):
    assert HybridConfig().gdn_fused_inputs is True
    gdn_model(False).config.save_pretrained(tmp_path)
    assert HybridConfig.from_pretrained(tmp_path).gdn_fused_inputs is False


@requires_cuda
def test_fused_inputs_match_on_the_gpu():
    """The Triton kernels, fp32 weights: matmuls in tf32 (u = 2^-11) in both forms, a few roundings apart."""
    assert_same_model("cuda", 4 * 2.0**-11, 16 * 2.0**-11, length=300)
