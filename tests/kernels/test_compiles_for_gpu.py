"""Every Triton kernel compiles for the GPUs we run on (sm_90: H100, H200; sm_80: A100), checked on the CPU.

The other CPU tests run the kernels in Triton's interpreter, which accepts code the compiler rejects (a variable
typed differently in the two branches of an `if`); such a kernel passes every interpreted test and then stops the
first GPU run. compile_for_gpu.py drives each op forward and backward through Triton's real compiler, ptxas
included, with a driver that launches nothing.
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _env(tmp_path, name):
    return {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / name)}


def _run(args, tmp_path, timeout=300):
    return subprocess.run([sys.executable, *args], env=_env(tmp_path, "triton-cache"), capture_output=True, text=True,
                          timeout=timeout, cwd=HERE.parent.parent)


def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path):
    """Both targets at once, one process each: a compile is single-threaded, and each takes minutes."""
    runs = {capability: subprocess.Popen([sys.executable, str(HERE / "compile_for_gpu.py"), str(capability)],
                                         env=_env(tmp_path, f"cache-{capability}"), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, cwd=HERE.parent.parent)
            for capability in (90, 80)}
    for capability, run in runs.items():
        stdout, stderr = run.communicate(timeout=1800)
        assert run.returncode == 0, f"sm_{capability}:\n" + stdout[-2000:] + stderr[-4000:]
        last = stdout.strip().splitlines()[-1]
        assert last.startswith(f"sm_{capability}: ") and last.endswith(" kernels compiled"), last


BRANCH_TYPED_KERNEL = '''
import sys
sys.path.insert(0, {here!r})
import torch
import triton
import triton.language as tl
import compile_for_gpu


@triton.jit
def branch_typed(x, H: tl.constexpr):
    if tl.program_id(0) < H:
        r = tl.load(x).to(tl.float32)
    else:
        r = tl.load(x)
    tl.store(x, r)


if sys.argv[1] == "compile":
    compile_for_gpu.install(90)
branch_typed[(2,)](torch.zeros(1, dtype=torch.bfloat16), H=1)
print("ran")
'''


def test_the_check_rejects_what_only_the_interpreter_accepts(tmp_path):
    """The defect this check exists for: a branch-typed variable runs interpreted, and fails to compile here."""
    script = tmp_path / "branch_typed.py"
    script.write_text(BRANCH_TYPED_KERNEL.format(here=str(HERE)))
    interpreted = subprocess.run([sys.executable, str(script), "interpret"], capture_output=True, text=True,
                                 env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert interpreted.returncode == 0 and interpreted.stdout.strip() == "ran", interpreted.stderr[-2000:]
    compiled = _run([str(script), "compile"], tmp_path, timeout=300)
    assert compiled.returncode != 0 and "Mismatched type for r" in compiled.stderr, compiled.stderr[-2000:]
