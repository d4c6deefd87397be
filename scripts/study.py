"""The design study (docs/results.md, "What each design choice buys").

Which layers, which mixers, how much attention, which stages, and what keeps a recurrent hybrid's recall.

Every run is the shipped commands, as a user types them: `hybridize analyze`, then per run
`hybridize distill recipes/smollm2-135m/study/<stages>.yaml --set plan=<plan> --out <dir>` and
`hybridize eval <dir>/final`; the headline also gets `hybridize bench` and `hybridize push --dry-run`.
This file only names the runs, builds their plan strings, and gathers the eval JSONs into tables.

    python scripts/study.py run [--only NAME ...] [--deadline SECONDS]   # skips runs already evaluated
    python scripts/study.py report --root runs/study                     # ROOT/study.json: one row per run,
                                                                         # ROOT/questions.png, ROOT/pareto.png
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hybridize.evaluate.plots import plt, save_figure  # plots.py selects the file-only backend first

TEACHER_LAYERS = 30
BUDGET = 8
ANALYZE_DIR = Path("runs/analyze-smollm2")
RECIPES = Path("recipes/smollm2-135m/study")
ABLATION_EVAL = ["--passkey-lengths", "1024,4096", "--passkey-trials", "2", "--mqar-pairs", "8,32"]
# Replaced layers cycle through these by depth; MGS is the H2 order of "Gated Delta Networks: Improving Mamba2 with
# Delta Rule" (arXiv:2412.06464): Mamba2 -> GDN -> SWA.
CYCLES = {"MGS": ("mamba2", "gated_deltanet", "sliding_attention"),
          "SGM": ("sliding_attention", "gated_deltanet", "mamba2"),
          "GMS": ("gated_deltanet", "mamba2", "sliding_attention")}


# What each question's panel in questions.png compares (a run may answer several: "layers/mixers").
QUESTIONS = {"layers": "which layers (8 kept, GDN elsewhere)", "mixers": "which mixers (analyzer's 8 kept)",
             "attention": "how much attention (K of 30 kept)", "stages": "which stages (3M tokens in all)",
             "analyzer": "analyzer vs other plans (stage 1 only)",
             "sinks": "windows that keep the first 4 tokens (sinks)",
             "recall": "what keeps a passkey (the GDN recipe, 80M tokens)"}
# The Pareto plot's speed axis: the hybrid's fast decode path at 8K context, batch 16.
BENCH_POINT = {"path": "hybrid fast", "context": 8192, "batch": 16}


@dataclass(frozen=True)
class Run:
    name: str
    question: str  # keys of QUESTIONS, joined by "/"
    stages: str  # a recipe in RECIPES: both, stage1_only, stage2_only, or ../NAME for a shipped SmolLM2 recipe
    plan: str | None  # anything `hybridize convert --plan` takes; None: the recipe's own
    kept: int = BUDGET
    sinks: int = 0  # the recipe's sink_tokens: sliding windows also keep each sequence's first `sinks` tokens
    overrides: tuple[str, ...] = ()  # more `--set KEY=VALUE` for `hybridize distill`


def analyzer_plan(budget: int) -> Path:
    return ANALYZE_DIR if budget == BUDGET else Path(f"{ANALYZE_DIR}-k{budget}")


# Attention in the layers that spread attention over distant content (3-9) and in 18, sink windows elsewhere: the
# plan the untrained sink probe ranked first (docs/runs/sink-probe_cpu_2026-11-23.md).
PLAN_F = "full_attention:3,4,5,6,7,8,9,18 sliding_attention:rest"
SINKS = 4

# The analyzer's own choice when it scores every window as a sink window (full mode, `--sink-tokens 4`).
ANALYZE_SINKS_DIR = Path(f"{ANALYZE_DIR}-s{SINKS}")

# The headline budget chosen for Gated DeltaNet alone: the kept layers a GDN hybrid needs differ from those that
# suit windows elsewhere (docs/results.md, "Which layers keep attention").
ANALYZE_GDN_DIR = Path(f"{ANALYZE_DIR}-gdn")


# What might keep a passkey in the Gated DeltaNet recipe, at its own 80M tokens: the quarter of each layer's heads
# with the longest mean attention distance starting at a 4096-token half-life (convert --init-long-heads),
# half-life parameters that train fast enough to move (half_life_lr; docs/distill.md, "Half-life lr"), and attention
# kept in the layers the teacher's readout of a passkey depends on most when one is replaced by GDN (0-2 for the
# start, 7, 16, 18, then 20 and 21 that read out: step-0 readout 0.031 of the teacher's against the recipe's 0.006, at
# step-0 KL 3.79 against 3.80; `python scripts/readout_sensitivity.py`, docs/runs/needle-readout_cpu_2026-12-05.md).
HALF_LIFE_LR = ("stages.0.half_life_lr=1e-2", "stages.1.half_life_lr=3e-3")
READOUT_LAYERS = "plan=full_attention:0,1,2,7,16,18,20,21 gated_deltanet:rest"
# The library is 97% code by tokens; at 80M tokens the recipe ends at 1.27x the teacher's prose perplexity against
# 1.02x on code (docs/results.md, "recipes/smollm2-135m/gdn.yaml"). These shares repeat docs and prose 10-17x in the
# pool.
PART_SHARES = ("data.part_shares.code=0.6", "data.part_shares.docs=0.2", "data.part_shares.prose=0.2")
# The recall runs below were measured at the teacher-calibrated init; `-rope-uncalibrated` at the convert default
# (every GDN layer an exact skip, each head a ~100-token memory writing at 1/2), which at 4M + 10M tokens with
# recurrent RoPE trains to KL 0.496 against the calibrated init's 0.760 (docs/results.md, "Recall levers at equal
# tokens").
CALIBRATED = ("init_gate=teacher", "init_decay=teacher", "init_beta=teacher")
UNCALIBRATED = ("init_gate=zero", "init_decay=slow", "init_beta=half")
# A quarter of stage 2's blocks with a 32-token span of their text copied 1K+ tokens further on: text whose
# prediction needs retrieval past what a window or a short memory holds (docs/distill.md, "Copied spans").
COPIES = ("stages.1.copied_spans={share: 0.25, tokens: 32, min_gap: 1024}",)


def lever(*overrides: str, rope: bool = False, long_heads: float = 0.0,
          init: tuple[str, ...] = CALIBRATED) -> tuple[str, ...]:
    """The GDN recipe's settings for one recall run: the init, recurrent RoPE and long-memory heads are set
    explicitly, since the recipe ships with RoPE on and the plain run has neither."""
    return (*init, f"recurrent_rope={str(rope).lower()}", f"init_long_heads={long_heads}", *overrides)


RECALL_LEVERS = {"": lever(), "-long-heads": lever(long_heads=0.25), "-half-life-lr": lever(*HALF_LIFE_LR),
                 "-long-heads-half-life-lr": lever(*HALF_LIFE_LR, long_heads=0.25),
                 "-readout-layers": lever(READOUT_LAYERS), "-rope": lever(rope=True),
                 "-rope-long-heads": lever(rope=True, long_heads=0.25),
                 "-rope-long-heads-shares": lever(*PART_SHARES, rope=True, long_heads=0.25),
                 "-rope-uncalibrated": lever(rope=True, init=UNCALIBRATED),
                 "-rope-long-heads-copies": lever(*COPIES, rope=True, long_heads=0.25)}


def kept_layers(plan_file: Path) -> list[int]:
    return [i for i, kind in enumerate(json.loads(plan_file.read_text())["layer_types"]) if kind == "full_attention"]


def cycled(kept: list[int], cycle: tuple[str, ...]) -> str:
    """A compact plan: `kept` full attention, the other layers cycling through `cycle` in depth order."""
    replaced = [i for i in range(TEACHER_LAYERS) if i not in kept]
    groups = {kind: [i for n, i in enumerate(replaced) if cycle[n % len(cycle)] == kind] for kind in cycle}
    parts = [f"full_attention:{','.join(map(str, kept))}"] if kept else []
    return " ".join(parts + [f"{kind}:{','.join(map(str, idx))}" for kind, idx in groups.items() if idx])


def runs() -> list[Run]:
    plan8 = analyzer_plan(BUDGET) / "plan.json"
    kept = kept_layers(plan8) if plan8.exists() else list(range(BUDGET))
    return [
        Run("headline", "mixers/stages/attention/sinks", "both", str(plan8)),
        Run("sinks-headline-s4", "sinks", "both", str(plan8), sinks=SINKS),
        Run("sinks-planF-s4", "sinks", "both", PLAN_F, sinks=SINKS),
        Run("sinks-analyzer-s4", "sinks", "both", str(ANALYZE_SINKS_DIR / "plan.json"), sinks=SINKS),
        Run("layers-analyzer-gdn", "layers/mixers", "both",
            f"full_attention:{','.join(map(str, kept))} gated_deltanet:rest"),
        Run("layers-uniform-gdn", "layers", "both", f"uniform:{BUDGET}:gated_deltanet"),
        Run("layers-analyzer-for-gdn", "layers", "both", str(ANALYZE_GDN_DIR / "plan.json")),
        Run("layers-first-gdn", "layers", "both", cycled(list(range(BUDGET)), ("gated_deltanet",))),
        Run("layers-last-gdn", "layers", "both", cycled(list(range(TEACHER_LAYERS - BUDGET, TEACHER_LAYERS)),
                                                         ("gated_deltanet",))),
        Run("mixers-mamba2", "mixers", "both", cycled(kept, ("mamba2",))),
        Run("mixers-swa", "mixers", "both", cycled(kept, ("sliding_attention",))),
        *[Run(f"mixers-{label}", "mixers", "both", cycled(kept, cycle)) for label, cycle in CYCLES.items()],
        Run("stages-stage1-only", "stages", "stage1_only", str(plan8)),
        Run("stages-stage2-only", "stages", "stage2_only", str(plan8)),
        *[Run(f"attention-k{k}", "attention", "both", str(analyzer_plan(k) / "plan.json"), kept=k) for k in (15, 5, 2)],
        Run("attention-k0", "attention", "both", str(analyzer_plan(0) / "plan.json"), kept=0),
        Run("analyzer-vs-uniform-stage1", "analyzer", "stage1_only", f"uniform:{BUDGET}:gated_deltanet"),
        Run("analyzer-vs-h2-stage1", "analyzer", "stage1_only", f"h2:{BUDGET}"),
        *[Run(f"recall-gdn{suffix}", "recall", "../gdn", None, overrides=overrides)
          for suffix, overrides in RECALL_LEVERS.items()],
    ]


def sh(command: list[str], log: Path) -> None:
    print("$", " ".join(repr(c) if " " in c else c for c in command), flush=True)
    with log.open("a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)


def hybridize(*args: str) -> list[str]:
    return [sys.executable, "-m", "hybridize.cli", *args]


def analyze(budgets: list[int]) -> None:
    """One full analysis at the headline budget; the other budgets, and the GDN-only choice, come from its scores
    (`--scores`, seconds)."""
    log = Path(f"{ANALYZE_DIR}.log")
    if not (ANALYZE_DIR / "plan.json").exists():
        ANALYZE_DIR.parent.mkdir(parents=True, exist_ok=True)
        sh(hybridize("analyze", "--budget", str(BUDGET), "--out", str(ANALYZE_DIR)), log)
    for k in budgets:
        if k != BUDGET and not (analyzer_plan(k) / "plan.json").exists():
            sh(hybridize("analyze", "--budget", str(k), "--scores", str(ANALYZE_DIR / "plan.json"),
                         "--out", str(analyzer_plan(k))), log)
    if not (ANALYZE_SINKS_DIR / "plan.json").exists():
        sh(hybridize("analyze", "--budget", str(BUDGET), "--sink-tokens", str(SINKS), "--out", str(ANALYZE_SINKS_DIR)),
           log)
    if not (ANALYZE_GDN_DIR / "plan.json").exists():
        sh(hybridize("analyze", "--budget", str(BUDGET), "--mixers", "gated_deltanet", "--scores",
                     str(ANALYZE_DIR / "plan.json"), "--out", str(ANALYZE_GDN_DIR)), log)


def distill_settings(run: Run) -> list[str]:
    """The run's `--set` values for `hybridize distill` on its recipe."""
    return ([f"plan={run.plan}"] * (run.plan is not None) + [f"sink_tokens={run.sinks}"] * (run.sinks > 0)
            + list(run.overrides))


def run_one(run: Run, root: Path) -> None:
    out = root / run.name
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{run.name}.log"  # beside the run folder: distill refuses an output folder that is not empty
    started = time.time()
    if not (out / "final" / "config.json").exists():
        resume = ["--resume"] if (out / "checkpoints").exists() else []
        settings = [a for setting in distill_settings(run) for a in ("--set", setting)]
        sh(hybridize("distill", str(RECIPES / f"{run.stages}.yaml"), *settings, "--out", str(out), *resume), log)
    # The headline candidates and the recall levers get the full recall suite.
    extra = [] if run.name == "headline" or run.question in ("sinks", "recall") else ABLATION_EVAL
    # --overwrite: a resumed study writes again over its own earlier results.
    sh(hybridize("eval", str(out / "final"), "--out", str(out / "eval"), "--overwrite", *extra), log)
    if run.name == "headline":
        sh(hybridize("bench", str(out / "final"), "--contexts", "8192", "--batch-sizes", "1,16",
                     "--out", str(out / "bench"), "--overwrite"), log)
        sh(hybridize("push", str(out / "final"), "hybridize/smollm2-135m-hybrid", "--dry-run", str(out / "push"),
                     "--overwrite"), log)
    elif run.question in ("attention", "sinks"):  # the Pareto plot's speed axis: the fast path at the bench point
        sh(hybridize("bench", str(out / "final"), "--contexts", "8192", "--batch-sizes", "16", "--paths", "hybrid-fast",
                     "--out", str(out / "bench"), "--overwrite"), log)
    (out / "study-run.json").write_text(json.dumps({**run.__dict__, "seconds": round(time.time() - started, 1)}))


def run_all(args) -> int:
    root = Path(args.root)
    budgets = sorted({r.kept for r in runs()})
    analyze(budgets)
    done = {r.name for r in runs() if (root / r.name / "study-run.json").exists()}  # distill writes its own run.json
    todo = [r for r in runs() if (not args.only or r.name in args.only) and r.name not in done]
    deadline = time.time() + args.deadline
    started: list[tuple[Run, subprocess.Popen]] = []
    for run in todo:
        while sum(child.poll() is None for _, child in started) >= args.parallel:
            time.sleep(2)
        if time.time() > deadline:
            break
        started.append((run, subprocess.Popen([sys.executable, __file__, "one", run.name, "--root", str(root)])))
    failed = [run.name for run, child in started if child.wait() != 0]
    print("failed:", failed or "none")
    return 1 if failed else 0


def metrics(root: Path, name: str) -> dict | None:
    path = root / name / "eval" / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_seconds(folder: Path) -> float | None:
    """Wall time of a finished run; None while its later steps (bench, push) have not finished."""
    record = folder / "study-run.json"
    return json.loads(record.read_text())["seconds"] if record.exists() else None


def bench_point(folder: Path) -> dict:
    """Decode tokens/s and cache bytes of the run's bench at BENCH_POINT; {} when it was not benched there."""
    path = folder / "bench" / "bench.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    row = next((r for r in rows if all(r[k] == v for k, v in BENCH_POINT.items()) and not r.get("oom")), None)
    if row is None:
        return {}
    return {"decode_tok_s": row["decode_tok_s"], "cache_bytes_per_seq": row["cache_bytes_per_seq"]}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (speed, kl) points no other point beats (as fast or faster and as close or closer, one of
    them strictly), by increasing speed."""
    def beaten(a, b):
        return b[0] >= a[0] and b[1] <= a[1] and b != a

    front = [i for i, p in enumerate(points) if not any(beaten(p, q) for q in points)]
    return sorted(front, key=lambda i: points[i][0])


def plot_questions(rows: list[dict], path: Path) -> None:
    """One panel per question: each run's KL to the teacher, labelled with its worst perplexity ratio."""
    asked = [q for q in QUESTIONS if any(q in row["question"].split("/") for row in rows)]
    fig, axes = plt.subplots(len(asked), 1, figsize=(8, 1.2 + 0.45 * len(rows) * len(asked) / 2), squeeze=False)
    for ax, question in zip(axes[:, 0], asked):
        answers = sorted((r for r in rows if question in r["question"].split("/")), key=lambda r: r["kl"])
        bars = ax.barh([r["run"] for r in answers], [r["kl"] for r in answers], color="#d9480f")
        worst = [max(v for k, v in r.items() if k.startswith("ppl_ratio_")) for r in answers]
        ax.bar_label(bars, [f"ppl ratio ≤ {w:.2f}" for w in worst], padding=3, fontsize=8)
        ax.set_xlim(0, 1.3 * answers[-1]["kl"])  # room for the labels
        ax.invert_yaxis()
        ax.set_title(QUESTIONS[question], fontsize=10)
    axes[-1, 0].set_xlabel("KL(teacher ‖ hybrid) per token, held-out text")
    fig.tight_layout()
    save_figure(fig, path)


def plot_pareto(rows: list[dict], path: Path) -> None:
    """KL against the fast path's decode speed at BENCH_POINT, one point per benched run, the front joined."""
    benched = [r for r in rows if r.get("decode_tok_s")]
    points = [(r["decode_tok_s"], r["kl"]) for r in benched]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(*zip(*points), color="#d9480f")
    for row, (x, y) in zip(benched, points):
        label = f"K={row['kept']}" + (f", {row['sinks']} sinks" if row.get("sinks") else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="#868e96", linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel(f"decode tokens/s ({BENCH_POINT['path']}, {BENCH_POINT['context']} context, "
                  f"batch {BENCH_POINT['batch']})")
    ax.set_ylabel("KL(teacher ‖ hybrid) per token")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def report(args) -> int:
    root = Path(args.root)
    if not root.is_dir():
        print(f"study report: no study folder {root} (run `python scripts/study.py run` first)", file=sys.stderr)
        return 2
    rows = []
    for run in runs():
        result = metrics(root, run.name)
        if result is None:
            continue
        domains = result["quality"]["domains"]
        overall = result["quality"]["all"]
        recall = result.get("recall", {})
        rows.append({"run": run.name, "question": run.question, "stages": run.stages, "plan": run.plan,
                     "kept": run.kept, "sinks": run.sinks,
                     **{f"ppl_ratio_{d}": v["student_ppl"] / v["teacher_ppl"] for d, v in domains.items()},
                     **{k: overall[k] for k in ("kl", "top1", "greedy_exact", "greedy_prefix")},
                     **{f"{test}_relative": recall[test]["relative"] for test in ("passkey", "mqar") if test in recall},
                     **bench_point(root / run.name),
                     "seconds": run_seconds(root / run.name)})
    (root / "study.json").write_text(json.dumps(rows, indent=1))
    if rows:
        plot_questions(rows, root / "questions.png")
    if any(row.get("decode_tok_s") for row in rows):
        plot_pareto(rows, root / "pareto.png")
    print(json.dumps(rows, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--only", nargs="*", default=None)
    run_parser.add_argument("--root", default="runs/study")
    run_parser.add_argument("--parallel", type=int, default=2,
                            help="runs sharing the GPU at once (a stage-2 run peaks near 30 GiB: 3 ran out of "
                                 "memory on an 80 GB H100)")
    run_parser.add_argument("--deadline", type=float, default=float("inf"), help="start no run after this many s")
    one = commands.add_parser("one")
    one.add_argument("name")
    one.add_argument("--root", default="runs/study")
    report_parser = commands.add_parser("report")
    report_parser.add_argument("--root", default="runs/study")
    args = parser.parse_args()
    if args.command == "one":
        run_one(next(r for r in runs() if r.name == args.name), Path(args.root))
        return 0
    return {"run": run_all, "report": report}[args.command](args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
