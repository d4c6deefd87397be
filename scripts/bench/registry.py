"""The kernel benchmark cases: per op, the shapes, the variants timed (ours, the peer's, other baselines), and the
bytes each call must move and the FLOPs it must do.

A case builds its inputs from a shape dict (`build`), and each variant binds them into the callable that is timed
(preparation, such as a peer's head expansion or an attention mask, happens at bind time, outside the timing).
To compare another way of calling an op on the same inputs, add an entry to the case's `ours` dict, e.g.
`"fwd, chunk 32": fwd(lambda x: chunk_gated_delta_rule(..., chunk_size=32)[0])`. An op that takes other inputs is
another case: `gated_delta.raw_inputs` times the gated delta rule from the layer's raw projections, the gate, the
q/k norms and beta formed inside the op against the PyTorch glue that forms them first; its `traffic` counts the
raw projections it reads instead of g and beta.

Traffic is the ideal: each pass reads its inputs once and writes its outputs once. A forward reads `reads` and
writes `writes`; a backward reads the inputs again and the output gradient, and writes `grads`. A decode step's
state is among both its reads and its writes (updated in place).
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from hybridize.kernels.conv1d import causal_conv1d
from hybridize.kernels.decode_attention import decode_attention
from hybridize.kernels.gated_delta import GateParams, chunk_gated_delta_rule, gated_delta_step
from hybridize.kernels.norm import gated_rms_norm
from hybridize.kernels.ssd import chunk_ssd, ssd_step
from hybridize.model.attention import attention_mask_for, sliding_window_attention
from hybridize.model.gated_deltanet import gate_and_beta, l2_normalize

FP32 = 4  # bytes: gates, decays and recurrent states stay fp32 whatever the activation dtype
FLA = "fla-core"


@dataclass(frozen=True)
class Variant:
    """One way to call an op: `bind(inputs)` returns the zero-argument callable that is timed."""

    bind: Callable[[dict], Callable[[], object]]
    backward: bool = False  # inputs take gradients, and the traffic counts the backward pass too
    cpu: bool = True  # False where PyTorch has no CPU path for it (flex attention's backward)


@dataclass(frozen=True)
class Traffic:
    """Ideal bytes of one forward: inputs read, outputs written, and the gradients a backward writes."""

    reads: int
    writes: int
    grads: int = 0

    def bytes(self, backward: bool) -> int:
        forward = self.reads + self.writes
        return forward + self.reads + self.writes + self.grads if backward else forward


@dataclass(frozen=True)
class Case:
    name: str
    about: str
    shapes: dict[str, tuple[dict, ...]]  # set name -> shapes; every case has "headline"
    build: Callable[[dict, torch.device, torch.dtype, bool], dict]  # (shape, device, dtype, grad) -> inputs
    ours: dict[str, Variant]
    peer: str  # the peer's name, printed as the column's meaning
    peer_variants: Callable[[], dict[str, Variant]]  # by variant name; {} when the peer is not installed
    traffic: Callable[[dict, int], Traffic] | None = None  # (shape, activation bytes) -> bytes; None: compute-bound
    flops: Callable[[dict, bool], int] | None = None  # (shape, backward) -> FLOPs, where they are meaningful
    others: dict[str, dict[str, Variant]] = field(default_factory=dict)  # further baselines, by name

    @property
    def op(self) -> str:
        return self.name.split(".")[0]

    def bytes(self, shape: dict, variant: str, itemsize: int) -> int | None:
        return None if self.traffic is None else self.traffic(shape, itemsize).bytes(self.ours[variant].backward)

    def flop_count(self, shape: dict, variant: str) -> int | None:
        return None if self.flops is None else self.flops(shape, self.ours[variant].backward)


def shape_label(shape: dict) -> str:
    """{"model": "SmolLM2", "B": 8, "T": 2048} -> "SmolLM2 B8 T2048"."""
    return " ".join(str(v) if k == "model" else f"{k}{v}" for k, v in shape.items())


def fwd(op: Callable[[dict], torch.Tensor]) -> Variant:
    return Variant(bind=lambda x: lambda: op(x))


def fwd_bwd(op: Callable[[dict], torch.Tensor], cpu: bool = True) -> Variant:
    """op's forward, then its backward from the output gradient x["do"]; gradients are cleared before each call."""

    def bind(x):
        leaves = [t for t in x.values() if isinstance(t, torch.Tensor) and t.requires_grad]

        def step():
            for t in leaves:
                t.grad = None
            op(x).backward(x["do"])

        return step

    return Variant(bind=bind, backward=True, cpu=cpu)


def step(op: Callable[[dict], object]) -> Variant:
    """A decode step: the same call as a forward; its traffic counts the state both read and written."""
    return fwd(op)


def with_inputs(variant: Variant, prepare: Callable[[dict], dict]) -> Variant:
    """variant on prepare(inputs), prepared at bind time (e.g. a peer that wants q and k expanded to every head)."""
    return Variant(bind=lambda x: variant.bind(prepare(x)), backward=variant.backward, cpu=variant.cpu)


def _randn(*shape, device, dtype, grad=False):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _log_decay(*shape, device, grad=False):
    """fp32 log decays near -0.13, the range trained gates sit in."""
    return F.logsigmoid(torch.randn(*shape, device=device) + 2.0).requires_grad_(grad)


# ---- fla-core, optional: each loader returns {} when the installed fla-core lacks the op ----

def _lift_fla_gated_backward_guard() -> None:
    """fla-core 0.6.0 refuses its gated backward (chunk_bwd_dqkwg with g) on Hopper under 3.4 <= Triton < 3.7.1,
    because its gradients are wrong there (fla #640). The guard is lifted so that the backward can be timed; its
    gradients are never used."""
    from fla.ops.common import chunk_o

    if hasattr(chunk_o, "TRITON_ABOVE_3_7_1"):
        chunk_o.TRITON_ABOVE_3_7_1 = True


def _fla_gated_delta_chunk() -> dict[str, Variant]:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except ImportError:
        return {}
    _lift_fla_gated_backward_guard()

    def op(x):  # g and beta by keyword: some fla-core signatures put gk, gv between them
        return fla_chunk(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], scale=x["q"].shape[-1] ** -0.5)[0]

    return {"fwd": fwd(op), "fwd+bwd": fwd_bwd(op)}


def _fla_gated_delta_raw() -> dict[str, Variant]:
    """fla-core's layer path: the q/k norms inside its op (use_qk_l2norm_in_kernel), the gate and beta in PyTorch."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except ImportError:
        return {}
    _lift_fla_gated_backward_guard()

    def op(x):
        q, k, v, a, b = _raw_views(x)
        g, beta = gate_and_beta(a, b, _gate_params(x))
        return fla_chunk(q, k, v, g=g, beta=beta, scale=q.shape[-1] ** -0.5, use_qk_l2norm_in_kernel=True)[0]

    return {"fwd": fwd(op), "fwd+bwd": fwd_bwd(op)}


def _fla_gated_delta_step() -> dict[str, Variant]:
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent
    except ImportError:
        return {}

    def op(x):  # fla's decode: a one-token sequence, the state passed in and the new one returned
        return fla_recurrent(x["q"][:, None], x["k"][:, None], x["v"][:, None], g=x["g"][:, None],
                             beta=x["beta"][:, None], initial_state=x["state"], output_final_state=True)

    return {"step": step(op)}


def _heads_expanded(x: dict, dim: int) -> dict:
    """q and k repeated from G groups to H heads (fla's simple_gla has no groups), as leaves of their own."""
    repeats = x["v"].shape[dim] // x["q"].shape[dim]
    return {**x, **{name: x[name].detach().repeat_interleave(repeats, dim=dim).requires_grad_(x[name].requires_grad)
                    for name in ("q", "k")}}


def _fla_ssd_chunk() -> dict[str, Variant]:
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return {}
    _lift_fla_gated_backward_guard()

    def op(x):
        return chunk_simple_gla(x["q"], x["k"], x["v"], x["g"], scale=x["q"].shape[-1] ** -0.5)[0]

    expand = lambda x: _heads_expanded(x, dim=2)  # noqa: E731 - [B, T, G, N] -> [B, T, H, N]
    return {"fwd": with_inputs(fwd(op), expand), "fwd+bwd": with_inputs(fwd_bwd(op), expand)}


def _fla_ssd_step() -> dict[str, Variant]:
    try:
        from fla.ops.simple_gla import fused_recurrent_simple_gla
    except ImportError:
        return {}

    def op(x):  # a one-token sequence of H heads, the state passed in and the new one returned
        return fused_recurrent_simple_gla(q=x["q"][:, None], k=x["k"][:, None], v=x["v"][:, None],
                                          g=x["g"][:, None], initial_state=x["state"], output_final_state=True)

    return {"step": with_inputs(step(op), lambda x: _heads_expanded(x, dim=1))}


def _fla_conv1d() -> dict[str, Variant]:
    try:
        from fla.modules.convolution import causal_conv1d as fla_conv
    except ImportError:
        return {}

    def op(x):
        return fla_conv(x=x["x"], weight=x["weight"], activation="silu")[0]

    return {"fwd": fwd(op), "fwd+bwd": fwd_bwd(op)}


def _fla_gated_rms_norm() -> dict[str, Variant]:
    try:
        from fla.modules.fused_norm_gate import rms_norm_gated
    except ImportError:
        return {}

    def op(x):
        return rms_norm_gated(x=x["x"], g=x["gate"], weight=x["weight"], bias=None, activation="swish", eps=1e-6)

    return {"fwd": fwd(op), "fwd+bwd": fwd_bwd(op)}


# ---- gated delta rule ----

def _gated_delta_chunk_inputs(s: dict, device, dtype, grad: bool) -> dict:
    B, T, H, D = s["B"], s["T"], s["H"], s["D"]
    q, k = (F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dtype).requires_grad_(grad)
            for _ in range(2))  # [B, T, H, D], unit rows as the layer gives them
    x = {"q": q, "k": k, "v": _randn(B, T, H, D, device=device, dtype=dtype, grad=grad),
         "g": _log_decay(B, T, H, device=device, grad=grad),
         "beta": torch.rand(B, T, H, device=device).to(dtype).requires_grad_(grad)}
    if grad:
        x["do"] = torch.randn_like(x["v"])  # [B, T, H, D]
    return x


def _gated_delta_chunk(x: dict) -> torch.Tensor:
    return chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=x["q"].shape[-1] ** -0.5)[0]


def _gated_delta_chunk_traffic(s: dict, a: int) -> Traffic:
    n = s["B"] * s["T"] * s["H"]
    reads = n * (3 * s["D"] * a + a + FP32)  # q, k, v, beta; g fp32
    return Traffic(reads=reads, writes=n * s["D"] * a, grads=reads)


def _gated_delta_step_inputs(s: dict, device, dtype, grad: bool) -> dict:
    B, H, D = s["B"], s["H"], s["D"]
    x = {name: t[:, 0].contiguous() for name, t in _gated_delta_chunk_inputs({**s, "T": 1}, device, dtype,
                                                                             False).items()}  # [B, H, ...]
    x["state"] = torch.randn(B, H, D, D, device=device)  # fp32 [B, H, K, V]
    return x


def _gated_delta_step_traffic(s: dict, a: int) -> Traffic:
    n, state = s["B"] * s["H"], s["B"] * s["H"] * s["D"] * s["D"] * FP32
    return Traffic(reads=n * (3 * s["D"] * a + a + FP32) + state, writes=n * s["D"] * a + state)


def _gated_delta_raw_inputs(s: dict, device, dtype, grad: bool) -> dict:
    """The layer's raw inputs: one [B, T, (2 HK + H) D] q/k/v projection and one [B, T, 2H] a/b projection (split
    into views as the layer splits them) and the fp32 per-head gate parameters."""
    B, T, HK, H, D = s["B"], s["T"], s["HK"], s["H"], s["D"]
    x = {"qkv": _randn(B, T, (2 * HK + H) * D, device=device, dtype=dtype, grad=grad),
         "ab": _randn(B, T, 2 * H, device=device, dtype=dtype, grad=grad),
         "A_log": torch.log(torch.linspace(1, 16, H, device=device)).requires_grad_(grad),
         "dt_bias": torch.full((H,), -4.0, device=device).requires_grad_(grad),  # decays of -0.02 to -0.3 a token
         "b_bias": torch.zeros(H, device=device).requires_grad_(grad), "heads": (HK, H, D)}
    if grad:
        x["do"] = torch.randn(B, T, H, D, device=device, dtype=dtype)  # [B, T, H, D]
    return x


def _raw_views(x: dict) -> tuple[torch.Tensor, ...]:
    """q, k [B, T, HK, D], v [B, T, H, D], a, b [B, T, H]: views of the two projections, no copies."""
    HK, H, D = x["heads"]
    q, k, v = (t.unflatten(-1, (-1, D)) for t in x["qkv"].split([HK * D, HK * D, H * D], -1))
    return (q, k, v, *x["ab"].split([H, H], -1))


def _gate_params(x: dict) -> GateParams:
    return GateParams(x["A_log"], x["dt_bias"], x["b_bias"])


def _gated_delta_raw_in_op(x: dict) -> torch.Tensor:
    q, k, v, a, b = _raw_views(x)
    return chunk_gated_delta_rule(q, k, v, a, b, gate_params=_gate_params(x), qk_l2norm=True)[0]


def _gated_delta_raw_glue(x: dict) -> torch.Tensor:
    q, k, v, a, b = _raw_views(x)
    g, beta = gate_and_beta(a, b, _gate_params(x))
    return chunk_gated_delta_rule(l2_normalize(q), l2_normalize(k), v, g, beta)[0]


def _gated_delta_raw_traffic(s: dict, a: int) -> Traffic:
    n = s["B"] * s["T"]
    reads = n * ((2 * s["HK"] + s["H"]) * s["D"] + 2 * s["H"]) * a + 3 * s["H"] * FP32
    return Traffic(reads=reads, writes=n * s["H"] * s["D"] * a, grads=reads)


# B * T = 16K tokens (B = 1 at 32K) at the SmolLM2-135M (9 heads) and Llama-3.2-1B (32 heads) head shapes
_GDN_MODEL_SHAPES = tuple({"model": model, "B": max(1, 16384 // T), "T": T, "H": H, "D": 64}
                          for model, H in (("SmolLM2-135M", 9), ("Llama-3.2-1B", 32)) for T in (2048, 8192, 32768))

# ---- Mamba2 SSD ----

def _ssd_chunk_inputs(s: dict, device, dtype, grad: bool) -> dict:
    B, T, G, H, N, P = s["B"], s["T"], s["G"], s["H"], s["N"], s["P"]
    x = {"q": _randn(B, T, G, N, device=device, dtype=dtype, grad=grad),
         "k": _randn(B, T, G, N, device=device, dtype=dtype, grad=grad),
         "v": _randn(B, T, H, P, device=device, dtype=dtype, grad=grad),
         "g": _log_decay(B, T, H, device=device, grad=grad)}
    if grad:
        x["do"] = torch.randn_like(x["v"])  # [B, T, H, P]
    return x


def _ssd_chunk(x: dict) -> torch.Tensor:
    return chunk_ssd(x["q"], x["k"], x["v"], x["g"], scale=x["q"].shape[-1] ** -0.5)[0]


def _ssd_chunk_traffic(s: dict, a: int) -> Traffic:
    tokens = s["B"] * s["T"]
    reads = tokens * (2 * s["G"] * s["N"] * a + s["H"] * s["P"] * a + s["H"] * FP32)  # q, k, v; g fp32
    return Traffic(reads=reads, writes=tokens * s["H"] * s["P"] * a, grads=reads)


def _ssd_step_inputs(s: dict, device, dtype, grad: bool) -> dict:
    x = {name: t[:, 0].contiguous() for name, t in _ssd_chunk_inputs({**s, "T": 1}, device, dtype, False).items()}
    x["state"] = torch.randn(s["B"], s["H"], s["N"], s["P"], device=device)  # fp32 [B, H, N, P]
    return x


def _ssd_step_traffic(s: dict, a: int) -> Traffic:
    B, G, H, N, P = s["B"], s["G"], s["H"], s["N"], s["P"]
    state = B * H * N * P * FP32
    return Traffic(reads=B * (2 * G * N * a + H * P * a + H * FP32) + state, writes=B * H * P * a + state)


def _ssd_model_shapes() -> tuple[dict, ...]:
    """B * T = 32K tokens at the Llama-3.2-1B (32 heads in 8 groups) and SmolLM2-135M (9 in 3) head shapes."""
    return tuple({"model": model, "B": 32768 // T, "T": T, "G": G, "H": H, "N": 64, "P": 64}
                 for T in (2048, 8192, 32768) for model, G, H in (("Llama-3.2-1B", 8, 32), ("SmolLM2-135M", 3, 9)))


# ---- short conv and gated RMSNorm ----

def _conv1d_inputs(s: dict, device, dtype, grad: bool) -> dict:
    x = {"x": _randn(s["B"], s["T"], s["D"], device=device, dtype=dtype, grad=grad),
         "weight": _randn(s["D"], s["W"], device=device, dtype=dtype, grad=grad)}
    if grad:
        x["do"] = torch.randn_like(x["x"])  # [B, T, D]
    return x


def _conv1d_traffic(s: dict, a: int) -> Traffic:
    reads = (s["B"] * s["T"] * s["D"] + s["D"] * s["W"]) * a  # x, weight
    return Traffic(reads=reads, writes=s["B"] * s["T"] * s["D"] * a, grads=reads)


def _conv1d_eager(x: dict) -> torch.Tensor:
    """PyTorch's depthwise conv1d, padded on the left, then SiLU: what the kernel replaces."""
    width, length = x["weight"].shape[1], x["x"].shape[1]
    y = F.conv1d(x["x"].transpose(1, 2), x["weight"][:, None], padding=width - 1, groups=x["weight"].shape[0])
    return F.silu(y[..., :length]).transpose(1, 2)  # [B, T, D]


def _norm_inputs(s: dict, device, dtype, grad: bool) -> dict:
    B, T, H, D = s["B"], s["T"], s["H"], s["D"]
    x = {"x": _randn(B, T, H, D, device=device, dtype=dtype, grad=grad),
         "gate": _randn(B, T, H, D, device=device, dtype=dtype, grad=grad),
         "weight": torch.ones(D, device=device, dtype=dtype, requires_grad=grad)}
    if grad:
        x["do"] = torch.randn_like(x["x"])  # [B, T, H, D]
    return x


def _norm_traffic(s: dict, a: int) -> Traffic:
    n = s["B"] * s["T"] * s["H"] * s["D"]
    reads = (2 * n + s["D"]) * a  # x, gate, weight
    return Traffic(reads=reads, writes=n * a, grads=reads)


def _norm(backend: str):
    return lambda x: gated_rms_norm(x["x"], x["gate"], x["weight"], backend=backend)


# ---- attention: one decode token over cached keys, and sliding windows ----

def _decode_attention_inputs(s: dict, device, dtype, grad: bool) -> dict:
    B, Hkv, G, D, S = s["B"], s["Hkv"], s["G"], s["D"], s["S"]
    return {"q": _randn(B, Hkv, G, D, device=device, dtype=dtype),  # the G query heads of a KV head as G rows
            "keys": _randn(B, Hkv, S, D, device=device, dtype=dtype),
            "values": _randn(B, Hkv, S, D, device=device, dtype=dtype),
            "valid": torch.ones(B, S, device=device, dtype=torch.bool)}


def _decode_attention_traffic(s: dict, a: int) -> Traffic:
    B, Hkv, G, D, S = s["B"], s["Hkv"], s["G"], s["D"], s["S"]
    return Traffic(reads=(B * Hkv * G * D + 2 * B * Hkv * S * D) * a + B * S, writes=B * Hkv * G * D * a)


def _sdpa_decode() -> dict[str, Variant]:
    def bind(x):
        mask = x["valid"][:, None, None, :]  # [B, 1, 1, S]
        return lambda: F.scaled_dot_product_attention(x["q"], x["keys"], x["values"], attn_mask=mask)

    return {"step": Variant(bind=bind)}


def _decode_attention_shapes(lengths) -> tuple[dict, ...]:
    return tuple({"model": model, "B": 16, "Hkv": Hkv, "G": G, "D": 64, "S": S}
                 for model, Hkv, G in (("SmolLM2-135M", 3, 3), ("Llama-3.2-1B", 8, 4)) for S in lengths)


def _window_inputs(s: dict, device, dtype, grad: bool) -> dict:
    B, T, D = s["B"], s["T"], s["D"]
    x = {"q": _randn(B, s["H"], T, D, device=device, dtype=dtype, grad=grad),
         "k": _randn(B, s["Hkv"], T, D, device=device, dtype=dtype, grad=grad),
         "v": _randn(B, s["Hkv"], T, D, device=device, dtype=dtype, grad=grad),
         "window": s["W"]}
    if grad:
        x["do"] = torch.randn_like(x["q"])  # [B, H, T, D]
    return x


def _flex_window(x: dict) -> torch.Tensor:
    return sliding_window_attention(x["q"], x["k"], x["v"], x["window"])


def _window_flops(s: dict, backward: bool) -> int:
    """2 matmuls of 2 FLOPs per (query, visible key, head dim) forward; a backward does 5 (scores again, dV, dP,
    dQ, dK)."""
    T, W = s["T"], s["W"]
    pairs = sum(min(t + 1, W) for t in range(T))  # keys each query sees, causal within the window
    forward = 4 * s["B"] * s["H"] * s["D"] * pairs
    return forward * 7 // 2 if backward else forward


def _sdpa_window(masked: bool) -> dict[str, Variant]:
    """SDPA with the dense window mask (the fallback path), or full causal SDPA (what a teacher layer costs)."""

    def op_for(x):
        if not masked:
            return lambda y: F.scaled_dot_product_attention(y["q"], y["k"], y["v"], is_causal=True, enable_gqa=True)
        slots = torch.arange(x["q"].shape[2], device=x["q"].device)
        mask = attention_mask_for(slots, slots, x["window"], None)  # [1, 1, T, T]
        return lambda y: F.scaled_dot_product_attention(y["q"], y["k"], y["v"], attn_mask=mask, enable_gqa=True)

    return {"fwd": Variant(bind=lambda x: fwd(op_for(x)).bind(x)),
            "fwd+bwd": Variant(bind=lambda x: fwd_bwd(op_for(x)).bind(x), backward=True)}


_LLAMA_WINDOW = {"H": 32, "Hkv": 8, "D": 64, "W": 512}  # Llama-3.2-1B heads, window 512

CASES = {case.name: case for case in (
    Case(
        name="gated_delta.step",
        about="Gated DeltaNet decode step, fp32 state updated in place",
        shapes={"headline": ({"B": 64, "H": 16, "D": 128},),
                "models": tuple({"model": model, "B": B, "H": H, "D": 64}
                                for model, H in (("SmolLM2-135M", 9), ("Llama-3.2-1B", 32)) for B in (64, 512))},
        build=_gated_delta_step_inputs,
        ours={"step": step(lambda x: gated_delta_step(x["q"], x["k"], x["v"], x["g"], x["beta"], x["state"]))},
        peer=f"{FLA} fused_recurrent_gated_delta_rule", peer_variants=_fla_gated_delta_step,
        traffic=_gated_delta_step_traffic,
    ),
    Case(
        name="gated_delta.chunk",
        about="Gated DeltaNet chunked form (training, prefill)",
        shapes={"headline": ({"B": 4, "T": 4096, "H": 16, "D": 128},), "models": _GDN_MODEL_SHAPES},
        build=_gated_delta_chunk_inputs,
        ours={"fwd": fwd(_gated_delta_chunk), "fwd+bwd": fwd_bwd(_gated_delta_chunk)},
        peer=f"{FLA} chunk_gated_delta_rule", peer_variants=_fla_gated_delta_chunk,
        traffic=_gated_delta_chunk_traffic,
    ),
    Case(
        name="gated_delta.raw_inputs",
        about="Gated DeltaNet from the layer's raw projections: gate, q/k norms and beta formed inside the op",
        shapes={"headline": ({"B": 4, "T": 4096, "HK": 16, "H": 16, "D": 128},),
                "models": ({"model": "SmolLM2-135M", "B": 8, "T": 2048, "HK": 3, "H": 9, "D": 64},
                           {"model": "Llama-3.2-1B", "B": 8, "T": 2048, "HK": 8, "H": 32, "D": 64})},
        build=_gated_delta_raw_inputs,
        ours={"fwd": fwd(_gated_delta_raw_in_op), "fwd+bwd": fwd_bwd(_gated_delta_raw_in_op)},
        peer=f"{FLA} chunk_gated_delta_rule(use_qk_l2norm_in_kernel), gate and beta in PyTorch",
        peer_variants=_fla_gated_delta_raw,
        traffic=_gated_delta_raw_traffic,
        others={"PyTorch glue": {"fwd": fwd(_gated_delta_raw_glue), "fwd+bwd": fwd_bwd(_gated_delta_raw_glue)}},
    ),
    Case(
        name="ssd.step",
        about="Mamba2 SSD decode step, fp32 state updated in place",
        shapes={"headline": ({"B": 64, "G": 32, "H": 32, "N": 128, "P": 64},),
                "models": ({"model": "Llama-3.2-1B", "B": 64, "G": 8, "H": 32, "N": 64, "P": 64},
                           {"model": "SmolLM2-135M", "B": 64, "G": 3, "H": 9, "N": 64, "P": 64})},
        build=_ssd_step_inputs,
        ours={"step": step(lambda x: ssd_step(x["q"], x["k"], x["v"], x["g"], x["state"]))},
        peer=f"{FLA} fused_recurrent_simple_gla", peer_variants=_fla_ssd_step,
        traffic=_ssd_step_traffic,
    ),
    Case(
        name="ssd.chunk",
        about="Mamba2 SSD chunked form (training, prefill)",
        shapes={"headline": ({"B": 4, "T": 4096, "G": 32, "H": 32, "N": 128, "P": 64},),
                "models": _ssd_model_shapes()},
        build=_ssd_chunk_inputs,
        ours={"fwd": fwd(_ssd_chunk), "fwd+bwd": fwd_bwd(_ssd_chunk)},
        peer=f"{FLA} chunk_simple_gla", peer_variants=_fla_ssd_chunk,
        traffic=_ssd_chunk_traffic,
    ),
    Case(
        name="conv1d",
        about="causal depthwise conv1d + SiLU, width 4 (Gated DeltaNet's q, k, v short conv)",
        shapes={"headline": ({"B": 4, "T": 4096, "D": 6144, "W": 4},)},
        build=_conv1d_inputs,
        ours={"fwd": fwd(lambda x: causal_conv1d(x["x"], x["weight"], activation="silu")[0]),
              "fwd+bwd": fwd_bwd(lambda x: causal_conv1d(x["x"], x["weight"], activation="silu")[0])},
        peer=f"{FLA} causal_conv1d", peer_variants=_fla_conv1d,
        traffic=_conv1d_traffic,
        others={"eager conv1d": {"fwd": fwd(_conv1d_eager), "fwd+bwd": fwd_bwd(_conv1d_eager)}},
    ),
    Case(
        name="gated_rms_norm",
        about="RMSNorm over the head dim gated by silu(gate) (Gated DeltaNet's output norm)",
        shapes={"headline": ({"B": 4, "T": 4096, "H": 16, "D": 128},)},
        build=_norm_inputs,
        ours={"fwd": fwd(_norm("auto")), "fwd+bwd": fwd_bwd(_norm("auto"))},
        peer=f"{FLA} rms_norm_gated", peer_variants=_fla_gated_rms_norm,
        traffic=_norm_traffic,
        others={"eager reference": {"fwd": fwd(_norm("reference")), "fwd+bwd": fwd_bwd(_norm("reference"))}},
    ),
    Case(
        name="decode_attention",
        about="split-KV attention of one new token over S cached slots, all valid",
        shapes={"headline": _decode_attention_shapes((8192,)),
                "models": (*_decode_attention_shapes((1024, 32768)),
                           {"model": "SmolLM2-135M", "B": 1, "Hkv": 3, "G": 3, "D": 64, "S": 8192})},
        build=_decode_attention_inputs,
        ours={"step": step(lambda x: decode_attention(x["q"], x["keys"], x["values"], x["valid"]))},
        peer="SDPA with the slot mask", peer_variants=_sdpa_decode,
        traffic=_decode_attention_traffic,
    ),
    Case(
        name="window_attention",
        about="sliding-window attention by compiled flex attention (training, a first prefill)",
        shapes={"headline": ({"model": "prefill", "B": 16, "T": 8128, **_LLAMA_WINDOW},
                             {"model": "train", "B": 4, "T": 8192, **_LLAMA_WINDOW}),
                "short": ({"model": "prefill", "B": 16, "T": 960, **_LLAMA_WINDOW},)},
        build=_window_inputs,
        ours={"fwd": fwd(_flex_window), "fwd+bwd": fwd_bwd(_flex_window, cpu=False)},
        peer="SDPA with the window mask", peer_variants=lambda: _sdpa_window(masked=True),
        flops=_window_flops,
        others={"full causal SDPA": _sdpa_window(masked=False)},
    ),
)}


def select(names: list[str]) -> list[Case]:
    """Cases by name or by op ("gated_delta" is every gated_delta.* case), in registry order; unknown names raise
    KeyError with the name."""
    for name in names:
        if not any(name in (case.name, case.op) for case in CASES.values()):
            raise KeyError(name)
    return [case for case in CASES.values() if not names or any(n in (case.name, case.op) for n in names)]
