"""MergedLoraLinear: peft's LoRA layer run as one GEMM with the adapter folded in; the same function and gradients."""

import torch
from helpers import requires_cuda
from peft import LoraConfig, LoraModel
from torch import distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hybridize.distill import merged_lora
from hybridize.distill.merged_lora import MergedLoraLinear

DIN, DOUT, RANK, ALPHA = 24, 40, 4, 8.0


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(DIN, DOUT, bias=False)

    def forward(self, x):
        return self.proj(x)


def adapted(merged: bool, dropout: float = 0.0, seed: int = 0) -> LoraModel:
    """A Linear with a rank-4 adapter whose B is random (peft starts it at zero), frozen base, the same for both."""
    torch.manual_seed(seed)
    block = Block()
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["proj"], bias="none")
    if merged:
        config._register_custom_module({nn.Linear: MergedLoraLinear})
    model = LoraModel(block, config, "default")
    with torch.no_grad():
        nn.init.normal_(model.model.proj.lora_B["default"].weight)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def forward_and_grads(model: LoraModel, x: torch.Tensor, dy: torch.Tensor, autocast: bool = False) -> dict:
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.backward(dy)
    layer = getattr(model.model.proj, "_orig_mod", model.model.proj)  # compiled or not
    return {"y": y.detach().float(), "dx": x.grad.float(), "dA": full(layer.lora_A["default"].weight.grad),
            "dB": full(layer.lora_B["default"].weight.grad)}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def test_the_custom_layer_is_peft_linear_with_the_merged_forward():
    layer = adapted(merged=True).model.proj
    assert type(layer) is MergedLoraLinear and layer._plain_adapter() == "default"
    assert type(adapted(merged=False).model.proj) is not MergedLoraLinear


def test_fp32_output_and_gradients_equal_peft():
    x, dy = torch.randn(3, 7, DIN), torch.randn(3, 7, DOUT)
    ours, peft = forward_and_grads(adapted(True), x, dy), forward_and_grads(adapted(False), x, dy)
    for name in ours:  # the same sums in another order: fp32 rounding of O(10) values
        torch.testing.assert_close(ours[name], peft[name], rtol=1e-5, atol=1e-4, msg=name)


def test_bf16_autocast_within_two_roundings_of_the_exact_function():
    """Under bf16 autocast every result is within a few bf16 roundings of the fp64 function of the same inputs:
    W' and the output are rounded once each (y); dy B, its products and dx once or twice (grads). The bound per entry
    is 3 * 2^-8 times the same sum of absolute products (what a rounding of each term can move)."""
    model = adapted(True)
    x, dy = torch.randn(5, DIN).bfloat16().float(), torch.randn(5, DOUT).bfloat16().float()
    ours = forward_and_grads(model, x, dy, autocast=True)
    layer = model.model.proj
    w, a, b = (t.double() for t in (layer.base_layer.weight, layer.lora_A["default"].weight,
                                    layer.lora_B["default"].weight))
    s = layer.scaling["default"]
    x64, dy64 = x.double(), dy.double()
    merged, merged_abs = w + s * b @ a, w.abs() + s * b.abs() @ a.abs()
    exact = {"y": x64 @ merged.T, "dx": dy64 @ merged, "dA": s * (dy64 @ b).T @ x64, "dB": s * dy64.T @ (x64 @ a.T)}
    scale = {"y": x64.abs() @ merged_abs.T, "dx": dy64.abs() @ merged_abs,
             "dA": s * (dy64.abs() @ b.abs()).T @ x64.abs(), "dB": s * dy64.abs().T @ (x64.abs() @ a.abs().T)}
    for name, value in exact.items():
        error = (ours[name].double() - value).abs()
        assert (error <= 3 * 2.0**-8 * scale[name] + 1e-12).all(), (name, (error / scale[name]).max().item())
    assert ours["dA"].dtype == ours["dB"].dtype == torch.float32  # the adapters' own dtype


def test_traces_as_one_graph_under_autocast():
    """The trainer compiles decoder layers: the layer must trace without a graph break (fullgraph raises on one),
    autocast queries and the Function included, and give the eager results."""
    x, dy = torch.randn(3, 5, DIN), torch.randn(3, 5, DOUT)
    eager = forward_and_grads(adapted(True), x, dy, autocast=True)
    model = adapted(True)
    model.model.proj = torch.compile(model.model.proj, backend="aot_eager", fullgraph=True)
    compiled = forward_and_grads(model, x, dy, autocast=True)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=0, atol=0, msg=name)


def test_dropout_a_disabled_adapter_or_no_gradients_run_peft_forward(monkeypatch):
    def refuse(*args):
        raise AssertionError("the merged path ran")

    monkeypatch.setattr(merged_lora.MergedLoraFunction, "apply", refuse)
    x = torch.randn(2, DIN)
    with torch.no_grad():
        torch.testing.assert_close(adapted(True).model.proj(x), adapted(False).model.proj(x))
    one_token = torch.randn(DIN, requires_grad=True)  # no token dimension to flatten
    torch.testing.assert_close(adapted(True).model.proj(one_token), adapted(False).model.proj(one_token))
    with_dropout = adapted(True, dropout=0.1)
    with_dropout.eval()  # dropout off, so that the two layers compare
    torch.testing.assert_close(with_dropout.model.proj(x), adapted(False, dropout=0.1).eval().model.proj(x))
    disabled = adapted(True)
    disabled.disable_adapter_layers()
    torch.testing.assert_close(disabled.model.proj(x), disabled.model.proj.base_layer(x))


def test_fsdp2_gives_the_adapters_their_gradients(tmp_path):
    """Under FSDP2 (one process) the layer runs on the gathered parameters and its adapter gradients reach the
    sharded ones: the same as without it."""
    x, dy = torch.randn(6, DIN), torch.randn(6, DOUT)
    expected = forward_and_grads(adapted(True), x, dy)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = adapted(True)
        fully_shard(model)
        assert isinstance(model.model.proj.lora_A["default"].weight, DTensor)
        actual = forward_and_grads(model, x, dy)
    finally:
        dist.destroy_process_group()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def test_merge_and_unload_gives_the_merged_weight():
    model = adapted(True)
    layer = model.model.proj
    expected = layer.base_layer.weight + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    plain = model.merge_and_unload(progressbar=False)
    assert type(plain.proj) is nn.Linear
    torch.testing.assert_close(plain.proj.weight, expected)


@requires_cuda
def test_cuda_compiled_bf16_training_step_equals_peft():
    """In compiled decoder layers on the GPU (bf16 autocast, as the trainer runs them): output and adapter gradients
    within bf16 rounding of peft's layer (each side rounds y, the adapter path and the gradients once or twice)."""
    x, dy = torch.randn(4, 512, DIN, device="cuda"), torch.randn(4, 512, DOUT, device="cuda")
    results = []
    for merged in (True, False):
        model = adapted(merged).cuda()
        model.model.proj = torch.compile(model.model.proj)
        x_ = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model.model.proj(x_)
        y.backward(dy)
        layer = model.model.proj._orig_mod
        results.append([y.float(), x_.grad.float(), layer.lora_A["default"].weight.grad,
                        layer.lora_B["default"].weight.grad])
    for ours, peft in zip(*results):
        torch.testing.assert_close(ours, peft, rtol=4 * 2.0**-8, atol=4 * 2.0**-8 * peft.abs().max().item())
