"""Greedy agreement of students whose only error is noise, at the KL a distilled hybrid reaches.

The teacher's own weights with Gaussian noise of a given share of each weight matrix's standard deviation (and
rounded to bf16, the smallest such error) are measured against the teacher as `hybridize eval` measures a hybrid:
KL and top-1 on held-out blocks, and the share of 32-token greedy continuations identical to the teacher's. A hybrid
that matches the teacher's greedy continuations more often than a noisy copy at its own KL has put its error away
from the greedy path; one that matches less often, on it.

    python scripts/greedy_at_equal_kl.py [--noise 0.005,0.01,0.02] [--teacher MODEL] [--small] [--out FILE]
"""

import argparse
import copy
from pathlib import Path

import torch

from hybridize.atomic import write_json_atomic
from hybridize.device import pick_device
from hybridize.evaluate.quality import QualitySettings, run_quality
from hybridize.teacher import load_teacher


def noisy_copy(teacher: torch.nn.Module, share: float, seed: int) -> torch.nn.Module:
    """The teacher with N(0, (share * std)^2) added to every weight matrix (std: that matrix's own); share 0 is the
    teacher rounded to bf16."""
    student = copy.deepcopy(teacher)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for param in student.parameters():
            if share == 0:
                param.copy_(param.to(torch.bfloat16))
            elif param.ndim >= 2:
                noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
                param.add_(noise * share * param.std())
    return student


def measure(teacher, tokenizer, shares: list[float], settings: QualitySettings, seed: int) -> list[dict]:
    rows = []
    for share in shares:
        results = run_quality(noisy_copy(teacher, share, seed), teacher, tokenizer, settings, log=lambda *_: None)
        every = results["all"]
        rows.append({"noise": share, "kl": every["kl"], "top1": every["top1"], "greedy_exact": every["greedy_exact"],
                     "greedy_prefix": every["greedy_prefix"]})
        print(f"{'bf16' if share == 0 else share:>8}  KL {every['kl']:.4f}  top-1 {every['top1']:.3f}  "
              f"greedy exact {every['greedy_exact']:.3f}  prefix {every['greedy_prefix']:.1f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", default="0,0.005,0.01,0.02",
                        help="noise shares of each weight matrix's std, comma-separated (0: bf16 rounding)")
    parser.add_argument("--teacher", default=None, help="alias or local Llama folder (default: the embedded one)")
    parser.add_argument("--small", action="store_true", help="eval --small's settings (a CPU-sized check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.float32, device=pick_device(args.device))
    settings = QualitySettings.small() if args.small else QualitySettings()
    rows = measure(teacher.eval(), tokenizer, [float(x) for x in args.noise.split(",")], settings, args.seed)
    if args.out:
        write_json_atomic(args.out, {"settings": vars(args) | {"out": str(args.out)}, "rows": rows})


if __name__ == "__main__":
    main()
