"""On a GPU the model runs the Triton kernels; it must agree with the CPU reference path and train the same way."""

import torch

from helpers import rel_rmse, requires_cuda
from hybridize.model import HybridConfig, HybridForCausalLM

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
