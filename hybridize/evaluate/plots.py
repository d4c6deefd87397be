"""PNG charts of eval and bench results: quality bar charts, passkey heat maps, speed and memory against context."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402

STUDENT_COLOR, TEACHER_COLOR = "#d9480f", "#1c7ed6"
PATH_STYLE = {"hybrid generate": ("#f08c00", "--"), "hybrid fast": (STUDENT_COLOR, "-"),
              "teacher generate": ("#74c0fc", "--"), "teacher static": (TEACHER_COLOR, "-")}


def save_figure(fig, path: Path) -> None:
    """Write fig to path atomically (a temporary file renamed into place), then close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def plot_eval(results: dict, path: Path) -> None:
    """Perplexity per domain, agreement numbers, and recall, hybrid and teacher side by side."""
    quality, recall = results["quality"], results.get("recall")
    domains = list(quality["domains"])
    has_teacher = "teacher_ppl" in quality["all"]
    panels = 1 + has_teacher + (recall is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = axes[0]
    ax = axes[0]
    width = 0.38
    xs = range(len(domains))
    ax.bar([x - width / 2 for x in xs], [quality["domains"][d]["student_ppl"] for d in domains], width,
           label="hybrid", color=STUDENT_COLOR)
    if has_teacher:
        ax.bar([x + width / 2 for x in xs], [quality["domains"][d]["teacher_ppl"] for d in domains], width,
               label="teacher", color=TEACHER_COLOR)
    ax.set_xticks(list(xs), domains)
    ax.set_yscale("log")
    ax.set_title("held-out perplexity (lower is better)")
    ax.legend(loc="best")
    if has_teacher:
        ax = axes[1]
        names = ["top-1 agree", "greedy exact", "prefix / 32"]
        new = quality["settings"]["greedy_new_tokens"]
        values = [quality["all"]["top1"], quality["all"]["greedy_exact"], quality["all"]["greedy_prefix"] / new]
        ax.bar(names, values, color=STUDENT_COLOR)
        ax.set_ylim(0, 1)
        ax.set_title(f"agreement with the teacher (KL {quality['all']['kl']:.3g} nats)")
    if recall is not None:
        ax = axes[-1]
        tests = ["passkey", "mqar"]
        xs = range(len(tests))
        ax.bar([x - width / 2 for x in xs], [recall[t]["student_mean"] for t in tests], width, label="hybrid",
               color=STUDENT_COLOR)
        if "teacher_mean" in recall["passkey"]:
            ax.bar([x + width / 2 for x in xs], [recall[t]["teacher_mean"] for t in tests], width, label="teacher",
                   color=TEACHER_COLOR)
        ax.set_xticks(list(xs), ["passkey (mean)", "MQAR (mean)"])
        ax.set_ylim(0, 1)
        ax.set_title("recall accuracy")
        ax.legend()
    save_figure(fig, path)


def plot_passkey(passkey: dict, path: Path) -> None:
    """Accuracy heat maps, depth (rows) by context length (columns), one per model."""
    models = [m for m in ("student", "teacher") if m in passkey]
    fig, axes = plt.subplots(1, len(models), figsize=((1.3 * len(passkey["lengths"]) + 2) * len(models) + 1, 4),
                             squeeze=False, layout="constrained")
    for k, (ax, model) in enumerate(zip(axes[0], models)):
        image = ax.imshow(passkey[model], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(passkey["lengths"])), [str(n) for n in passkey["lengths"]])
        ax.set_yticks(range(len(passkey["depths"])), [f"{d:.0%}" for d in passkey["depths"]])
        for i, row in enumerate(passkey[model]):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"passkey: {'hybrid' if model == 'student' else 'teacher'} ({passkey[f'{model}_mean']:.0%})")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    save_figure(fig, path)


def plot_bench(result: dict, path: Path) -> None:
    """Decode and prefill speed, peak memory and cache bytes per sequence against context, per path and batch."""
    metrics = [("decode_tok_s", "decode tokens/s"), ("prefill_tok_s", "prefill tokens/s"),
               ("peak_mem_gib", "peak GPU memory (GiB)"), ("cache_bytes_per_seq", "cache bytes per sequence")]
    batches = sorted({r["batch"] for r in result["rows"]})
    markers = "os^vD*"
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    legend: dict = {}
    for ax, (key, title) in zip(axes.flat, metrics):
        for path_name, (color, style) in PATH_STYLE.items():
            for b, batch in enumerate(batches):
                rows = [r for r in result["rows"] if r["path"] == path_name and r["batch"] == batch
                        and r.get(key) is not None]
                if rows:
                    label = f"{path_name}, batch {batch}"
                    (legend[label],) = ax.plot([r["context"] for r in rows], [r[key] for r in rows], color=color,
                                               linestyle=style, marker=markers[b % len(markers)], label=label)
        ax.set_title(title)
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured on this device", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"hybrid vs teacher on {result['device']} ({result['dtype']})")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, path)
