"""Compile every Triton kernel of hybridize.kernels for a GPU target, on a machine without one.

    TRITON_INTERPRET=0 python tests/kernels/compile_for_gpu.py 90     # sm_90 (H100, H200); 80 for A100

The CPU tests run the kernels in Triton's interpreter, which executes the Python body as NumPy and never type-checks
it the way the compiler does: a variable assigned an fp32 value in one branch of an `if` and a bf16 one in the other
runs fine interpreted and stops the compiler. This script drives each op's Triton path forward and backward with
small CPU tensors in bf16 and fp32, with a driver that names the GPU target and launches nothing: every kernel call
goes through Triton's full compile (front end, TTGIR, LLVM, PTX, ptxas), each autotuned kernel once per config. It
prints one line per compiled kernel and exits non-zero on the first compile error, or if a kernel of the package
was never compiled.
"""

import importlib
import inspect
import pkgutil
import re
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

import hybridize.kernels
from hybridize.kernels.conv1d import chunk as conv_chunk
from hybridize.kernels.conv1d import recurrent as conv_recurrent
from hybridize.kernels.decode_attention import split_kv, store
from hybridize.kernels.gated_delta import chunk as gdn_chunk
from hybridize.kernels.gated_delta import layer_step
from hybridize.kernels.gated_delta import recurrent as gdn_recurrent
from hybridize.kernels.gated_delta.reference import GateParams
from hybridize.kernels.kd_rows import online
from hybridize.kernels.norm import chunk as norm_chunk
from hybridize.kernels.ssd import chunk as ssd_chunk
from hybridize.kernels.ssd import layer_step as ssd_layer_step
from hybridize.kernels.ssd import recurrent as ssd_recurrent


class CompileOnlyDriver:
    """The driver Triton asks for the device, stream and target: a GPU of compute capability `capability`."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


compiled: set[str] = set()
_jit_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _jit_run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.add(f"{self.fn.__module__}.{self.fn.__name__}")
    return kernel


def _compile_every_config(self, *args, **kwargs):
    """Each config that the autotuner's pruning keeps, compiled in turn (where Triton would benchmark them)."""
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs):
        self.fn.run(*args, **kwargs, **config.all_kwargs())
    self.nargs = None


def _grads(outputs, inputs):
    """Run the backward of `outputs` into `inputs` (their values are garbage: nothing ran, only compiled)."""
    outputs = [o for o in outputs if o is not None and o.requires_grad]
    torch.autograd.grad(outputs, [x for x in inputs if x.requires_grad], [torch.ones_like(o) for o in outputs],
                        allow_unused=True)


def _leaf(*shape, dtype, grad=True):
    return torch.randn(*shape).to(dtype).requires_grad_(grad)


CU_SEQLENS = torch.tensor([0, 37, 80], dtype=torch.int32)  # two packed sequences in the 80 tokens of row 0
CU_SEQLENS_37 = torch.tensor([0, 20, 37], dtype=torch.int32)


def _packed_states(h0):
    """One initial state per packed sequence, from the batch's first row's."""
    return torch.cat([h0[:1], h0[:1]])


def gated_delta(dtype):
    B, T, HK, H, K, V = 1, 80, 2, 4, 64, 64
    q, k = _leaf(B, T, HK, K, dtype=dtype), _leaf(B, T, HK, K, dtype=dtype)
    v = _leaf(B, T, H, V, dtype=dtype)
    a, b = _leaf(B, T, H, dtype=torch.float32), _leaf(B, T, H, dtype=torch.float32)
    params = GateParams(*(_leaf(H, dtype=torch.float32) for _ in range(3)))
    h0 = _leaf(B, H, K, V, dtype=torch.float32)
    # training (raw inputs, no states), prefill into a cache, chunked prefill, and packed sequences
    for raw, initial, final, packed in [(True, False, False, False), (True, False, True, False),
                                        (False, True, True, False), (True, True, True, True),
                                        (False, False, False, True)]:
        o, ht = gdn_chunk.chunk_gated_delta_rule(
            q, k, v, a, b, initial_state=_packed_states(h0) if initial and packed else h0 if initial else None,
            output_final_state=final, cu_seqlens=CU_SEQLENS if packed else None,
            gate_params=params if raw else None, qk_l2norm=raw)
        _grads([o, ht], [q, k, v, a, b, h0, *params])
    with torch.no_grad():
        step = [x[:, 0] for x in (q, k, v, a, b)]
        state = h0.detach().clone()
        gdn_recurrent.gated_delta_step(*step, state)
        gdn_recurrent.gated_delta_step(*step, state, gate_params=params, qk_l2norm=True)
        channels = 2 * HK * K + H * V
        layer_step.gated_delta_layer_step(
            torch.randn(B, channels).to(dtype), step[3], step[4], torch.randn(B, H * V).to(dtype),
            torch.randn(channels, 4).to(dtype), torch.randn(B, channels, 3).to(dtype), state, params,
            torch.ones(V).to(dtype), k_heads=HK)


def ssd(dtype):
    B, T, G, H, N, P = 1, 80, 1, 4, 64, 64
    q, k = _leaf(B, T, G, N, dtype=dtype), _leaf(B, T, G, N, dtype=dtype)
    v, g = _leaf(B, T, H, P, dtype=dtype), (-torch.rand(B, T, H)).requires_grad_()
    h0 = _leaf(B, H, N, P, dtype=torch.float32)
    for initial, final, packed in [(False, False, False), (True, True, False), (True, True, True)]:
        o, ht = ssd_chunk.chunk_ssd(
            q, k, v, g, initial_state=_packed_states(h0) if initial and packed else h0 if initial else None,
            output_final_state=final, cu_seqlens=CU_SEQLENS if packed else None)
        _grads([o, ht], [q, k, v, g, h0])
    with torch.no_grad():
        state = h0.detach().clone()
        ssd_recurrent.ssd_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state)
        channels = H * P + 2 * G * N
        per_head = [torch.randn(H) for _ in range(3)]
        ssd_layer_step.ssd_layer_step(
            torch.randn(B, channels).to(dtype), torch.randn(B, H), torch.randn(B, H * P).to(dtype),
            torch.randn(channels, 4).to(dtype), torch.randn(channels).to(dtype), torch.randn(B, channels, 3).to(dtype),
            state, *per_head, torch.ones(P).to(dtype), groups=G)


def conv(dtype):
    B, T, D, W = 2, 37, 96, 4
    x, weight, bias = _leaf(B, T, D, dtype=dtype), _leaf(D, W, dtype=dtype), _leaf(D, dtype=dtype)
    h0 = _leaf(B, D, W - 1, dtype=dtype)
    for with_bias, activation, initial, final, packed in [(False, "silu", False, False, False),
                                                         (True, "silu", True, True, False),
                                                         (True, None, True, True, True)]:
        rows = x[:1] if packed else x
        y, state = conv_chunk.causal_conv1d(
            rows, weight, bias if with_bias else None, activation=activation,
            initial_state=_packed_states(h0) if initial and packed else h0 if initial else None,
            output_final_state=final, cu_seqlens=CU_SEQLENS_37 if packed else None)
        _grads([y, state], [x, weight, bias, h0])
    with torch.no_grad():
        conv_recurrent.causal_conv1d_step(x[:, 0], weight, bias, conv_state=h0.detach().clone(), activation="silu")


def norm(dtype):
    x, gate, weight = _leaf(3, 5, 64, dtype=dtype), _leaf(3, 5, 64, dtype=dtype), _leaf(64, dtype=dtype)
    for gated in (True, False):
        _grads([norm_chunk.gated_rms_norm(x, gate if gated else None, weight)], [x, gate, weight])


def decode_attention(dtype):
    B, HKV, G, S, D = 2, 2, 4, 300, 64
    keys, values = torch.randn(B, HKV, S, D).to(dtype), torch.randn(B, HKV, S, D).to(dtype)
    split_kv.decode_attention(torch.randn(B, HKV, G, D).to(dtype), keys, values, torch.ones(B, S, dtype=torch.bool))
    q, k, v = torch.randn(B, HKV * G, D).to(dtype), torch.randn(B, HKV, D).to(dtype), torch.randn(B, HKV, D).to(dtype)
    store.rope_store(q, k, v, torch.randn(B, D), torch.randn(B, D), keys, values, torch.tensor([7]),
                     torch.tensor([-1, 3]))


def kd_rows(dtype):
    student, teacher = torch.randn(64, 1000).to(dtype), torch.randn(64, 1000).to(dtype)
    labels = torch.randint(0, 1000, (64,))
    for divergence in online.DIVERGENCES:
        for temperature in (1.0, 2.0):
            online.kd_rows(student, teacher, labels, temperature=temperature, divergence=divergence, jsd_beta=0.5,
                           grad_scale=torch.ones(64), ce_grad_scale=torch.ones(64))


OPS = [gated_delta, ssd, conv, norm, decode_attention, kd_rows]


def launched_kernels() -> set[str]:
    """Qualified names of the package's kernels: every autotuned @triton.jit function (only launches are tuned), and
    every other one that its module's source launches by name (`name[grid](...)`)."""
    names = set()
    for info in pkgutil.walk_packages(hybridize.kernels.__path__, "hybridize.kernels."):
        module = importlib.import_module(info.name)
        source = inspect.getsource(module)
        for name, value in vars(module).items():
            tuned = isinstance(value, Autotuner)
            if not (tuned or isinstance(value, JITFunction)):
                continue
            fn = value.fn.fn if tuned else value.fn
            if fn.__module__ == info.name and (tuned or re.search(rf"\b{name}\[", source)):
                names.add(f"{fn.__module__}.{fn.__name__}")
    return names


def install(capability: int) -> None:
    """From here on, a kernel launch in this process compiles for sm_`capability` and launches nothing."""
    driver.set_active(CompileOnlyDriver(capability))
    JITFunction.run = _compile_only
    Autotuner.run = _compile_every_config


def main() -> int:
    capability = int(sys.argv[1])
    install(capability)
    for op in OPS:
        for dtype in (torch.bfloat16, torch.float32):
            op(dtype)
            print(f"sm_{capability} {op.__name__} {str(dtype)[6:]}: compiled", flush=True)
    missing = sorted(launched_kernels() - compiled)
    if missing:
        print(f"never compiled: {', '.join(missing)}")
        return 1
    print(f"sm_{capability}: {len(compiled)} kernels compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
