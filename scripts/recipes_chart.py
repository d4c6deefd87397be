"""The shipped recipes on one chart: closeness to the teacher (KL) against decode speed-up over the teacher.

Each result folder is one that `bash scripts/gpu/recipe.sh RECIPE` writes (eval.json and bench.json side by side).
The speed axis is the hybrid's fast decode path over the teacher's static-cache path at 8K context, batch 16, both
timed in the same bench run: a ratio, so runs benched on differently loaded GPUs still compare. The runs no other
run beats on both axes are joined (the Pareto front). A folder without a bench.json at that point is listed on
stderr and left off the chart.

    python scripts/recipes_chart.py docs/results/headline-s4-12m=windows-sinks docs/results/window-gdn \\
        --out docs/results/recipes.png      # FOLDER[=LABEL] ...; prints one JSON row per charted folder
"""

import argparse
import json
import sys
from pathlib import Path

from hybridize.evaluate.plots import plt, save_figure  # plots.py selects the file-only backend first
from study import BENCH_POINT, pareto_front


def recipe_row(folder: Path, label: str) -> dict | None:
    """KL, worst perplexity ratio, recall shares and the decode speed-up at BENCH_POINT; None without that bench."""
    bench_path = folder / "bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.exists() else {"ratios": []}
    ratio = next((r for r in bench["ratios"]
                  if r["context"] == BENCH_POINT["context"] and r["batch"] == BENCH_POINT["batch"]), None)
    if ratio is None:
        return None
    results = json.loads((folder / "eval.json").read_text())
    domains = results["quality"]["domains"]
    return {"recipe": label, "kl": results["quality"]["all"]["kl"],
            "ppl_ratio_worst": max(d["student_ppl"] / d["teacher_ppl"] for d in domains.values()),
            "passkey_relative": results["recall"]["passkey"]["relative"],
            "mqar_relative": results["recall"]["mqar"]["relative"],
            "decode_speedup": ratio["decode_speedup"], "cache_ratio": ratio["cache_ratio"]}


def plot_recipes(rows: list[dict], path: Path) -> None:
    points = [(row["decode_speedup"], row["kl"]) for row in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(*zip(*points), color="#d9480f")
    for index, (row, point) in enumerate(zip(rows, points)):
        ax.annotate(f"{row['recipe']}\npasskey {row['passkey_relative']:.2f}, cache {row['cache_ratio']:.2f}×",
                    point, textcoords="offset points", xytext=(5, 4 if index % 2 else -20), fontsize=7)
    ax.margins(x=0.3, y=0.2)  # room for the labels of the outermost points
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="#868e96", linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel(f"decode speed-up over the teacher ({BENCH_POINT['context']} context, batch {BENCH_POINT['batch']})")
    ax.set_ylabel("KL(teacher ‖ hybrid) per token")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="FOLDER or FOLDER=LABEL (default label: the folder's name)")
    parser.add_argument("--out", required=True, help="the chart, a .png")
    args = parser.parse_args()
    rows = []
    for spec in args.folders:
        folder, _, label = spec.partition("=")
        if not (Path(folder) / "eval.json").exists():
            print(f"recipes_chart: {folder} holds no eval.json", file=sys.stderr)
            return 2
        row = recipe_row(Path(folder), label or Path(folder).name)
        if row is None:
            print(f"recipes_chart: {folder}: no bench at {BENCH_POINT['context']} context, batch "
                  f"{BENCH_POINT['batch']}; left off the chart", file=sys.stderr)
        else:
            rows.append(row)
    if not rows:
        print("recipes_chart: nothing to chart", file=sys.stderr)
        return 2
    plot_recipes(rows, Path(args.out))
    print("\n".join(json.dumps(row) for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
