"""What the GDN WY kernel costs an H100 SM, read from its sm_90 build on the CPU (no GPU needed).

Run: python scripts/sm90_resources.py
Compiles `_wy_fwd_kernel` with Triton's own ptxas for every (K, warps) pair its autotuner may be offered and prints
registers a thread, spill stack a thread, how many CTAs of it fit one SM by registers, and the SASS size
(docs/runs/kernels_h100_2026-11-23.md: why the 4-warp build is the faster one at K=128).
"""

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hybridize.kernels.gated_delta import chunk

H100 = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM = 65536
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# The forward-with-gradients launch (STORE_AI): bf16 q/k/v/beta as in training, fp32 gates, states and Ai.
POINTERS = {"k": "*bf16", "v": "*bf16", "g": "*fp32", "beta": "*bf16", "gc": "*fp32", "Ai": "*fp32", "w": "*bf16",
            "u": "*bf16", "cu_seqlens": "*i32", "chunk_indices": "*i32", "T": "i32"}


def build(K: int, num_warps: int) -> bytes:
    fn = chunk._wy_fwd_kernel.fn
    constants = dict(H=16, HK=16, K=K, V=K, BT=64, BK=chunk._bk(K), BV=64, IS_VARLEN=False, STORE_AI=True)
    source = ASTSource(fn, {**POINTERS, **dict.fromkeys(constants, "constexpr")},
                       constexprs={(fn.arg_names.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=H100, options={"num_warps": num_warps, "num_stages": 2}).asm["cubin"]


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([CUOBJDUMP, flag, f.name], capture_output=True, text=True, check=True).stdout


def main() -> None:
    print(f"triton {triton.__version__}, target sm_90; _wy_fwd_kernel, BT=64, BV=64, num_stages=2")
    for K in (16, 32, 64, 128):
        for num_warps in (4, 8):
            cubin = build(K, num_warps)
            regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", cuobjdump(cubin, "-res-usage")).groups())
            sass = cuobjdump(cubin, "-sass").splitlines()
            sass_lines = sum(1 for line in sass if re.search(r"/\*[0-9a-f]+\*/ ", line))
            ctas = REGISTERS_PER_SM // (regs * 32 * num_warps)
            print(f"K={K:<4d} warps={num_warps}  registers {regs:3d}  spill stack {stack:5d} B  "
                  f"CTAs/SM by registers {ctas}  warps/SM {ctas * num_warps:2d}  SASS instructions {sass_lines}")


if __name__ == "__main__":
    main()
