"""Greedy agreement against KL for trained hybrids, beside copies of the teacher whose only error is noise.

Each FOLDER holds an eval.json (`hybridize eval`); its KL and greedy exact agreement are over every domain. The
noise curve is the rows file that `scripts/greedy_at_equal_kl.py --out` writes. Prints one JSON row per folder, by
KL, and draws both on one chart: how much closer to the teacher a hybrid would have to come for its greedy
continuations to match the teacher's a given share of the time.

    python scripts/greedy_vs_kl.py docs/results/* --noise docs/results/greedy-at-equal-kl/rows.json \\
        --out docs/results/greedy-vs-kl.png
"""

import argparse
import json
import sys
from pathlib import Path

from hybridize.evaluate.plots import plt, save_figure  # plots.py selects the file-only backend first


def hybrid_row(folder: Path) -> dict:
    every = json.loads((folder / "eval.json").read_text())["quality"]["all"]
    return {"hybrid": folder.name, "kl": every["kl"], "top1": every["top1"], "greedy_exact": every["greedy_exact"],
            "greedy_prefix": every["greedy_prefix"]}


def plot(rows: list[dict], noise: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([r["kl"] for r in rows], [r["greedy_exact"] for r in rows], color="#d9480f", label="trained hybrids")
    curve = sorted(noise, key=lambda r: r["kl"])
    ax.plot([r["kl"] for r in curve], [r["greedy_exact"] for r in curve], color="#1c7ed6", marker="o",
            label="the teacher with weight noise")
    ax.set_xscale("log")
    ax.set_xlabel("KL(teacher ‖ model) per token, every domain")
    ax.set_ylabel("32-token greedy continuations equal to the teacher's")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="result folders; those without an eval.json are skipped")
    parser.add_argument("--noise", required=True, type=Path, help="rows written by scripts/greedy_at_equal_kl.py")
    parser.add_argument("--out", required=True, type=Path, help="the chart, a .png")
    args = parser.parse_args()
    if not args.noise.is_file():
        print(f"greedy_vs_kl: {args.noise} is not a file (write it with scripts/greedy_at_equal_kl.py --out)",
              file=sys.stderr)
        return 2
    rows = sorted((hybrid_row(f) for f in args.folders if (f / "eval.json").is_file()), key=lambda r: r["kl"])
    if not rows:
        print("greedy_vs_kl: none of the folders holds an eval.json", file=sys.stderr)
        return 2
    plot(rows, json.loads(args.noise.read_text())["rows"], args.out)
    print("\n".join(json.dumps(row) for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
