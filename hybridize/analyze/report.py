"""The analysis report: a markdown summary, a PNG chart of the scores per layer with the chosen plan marked, and the
atomic write of the output folder (plan.json, report.md, scores.png)."""

import io
import json
from pathlib import Path

from ..atomic import staged_folder
from ..convert.plan import SHORT_NAMES, describe
from ..model.configuration_hybrid import HEADWISE_TYPES
from .proxies import PROXY_NAMES, distant_content

COLORS = {"mamba2": "tab:orange", "gated_deltanet": "tab:green", "sliding_attention": "tab:purple",
          "window_gated_deltanet": "tab:olive", "window_mamba2": "tab:cyan"}
COLORS.update({kind: COLORS[memory] for kind, memory in HEADWISE_TYPES.items()})  # the color of their recurrent heads
PROXY_COLORS = {"entropy": "tab:gray", "distance": "tab:brown", "outside_window": "tab:pink", "induction": "tab:red"}
# A planned window that drops more than this share of its layer's attention on distant content (not the first-token
# sink) gets a warning: on SmolLM2 the layers above it (3-9, 0.35-0.5) were the ones whose windows cost the passkey
# recall after distillation, while their text KL was tiny (docs/runs/sink-probe_cpu_2026-11-23.md).
DISTANT_CONTENT_WARNING = 0.2


def _number(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def distant_content_warning(layers: list[dict]) -> list[str]:
    """Report lines naming the planned windows that discard much distant content (none: no lines)."""
    flagged = [(row["layer"], distant_content(row["proxies"]["outside_window"], row.get("first_token")))
               for row in layers if row["choice"] == "sliding_attention"]
    flagged = [(layer, mass) for layer, mass in flagged if mass is not None and mass > DISTANT_CONTENT_WARNING]
    if not flagged:
        return []
    listed = ", ".join(f"{layer} ({mass:.2f})" for layer, mass in flagged)
    return [f"Warning: the windows planned in layers {listed} discard more than {DISTANT_CONTENT_WARNING} of their "
            "attention mass on distant content. Text KL barely sees it; long-context recall (passkey) does. Keep "
            "attention there, or allow only recurrent mixers for them (--mixers), if long contexts matter.", ""]


def markdown_report(record: dict) -> str:
    """The summary printed to the terminal and saved as report.md."""
    settings, layers = record["settings"], record["layers"]
    kinds = list(settings["mixers"])
    num_layers = len(layers)
    lines = [
        f"# hybridize analyze: {record['teacher']['name']} ({record['mode']} mode)",
        "",
        f"Keep **{record['budget']} of {num_layers}** layers as full attention (budget {settings['budget']!r}); "
        f"mixers {', '.join(kinds)}; pattern {settings['pattern']}; no attention in the first "
        f"{settings['no_attention_first']} layers; min spacing {settings['min_spacing']}.",
        "",
        "```",
        describe(record["layer_types"]),
        "```",
        "",
    ]
    header = ["layer", *PROXY_NAMES, "of which first token"]
    if record["mode"] == "full":
        header += [f"KL {kind}" for kind in kinds]
    header += ["sensitivity", "plan"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in layers:
        cells = [str(row["layer"])] + [_number(row["proxies"][name]) for name in PROXY_NAMES]
        cells.append(_number(row.get("first_token")))  # absent from plans written before it was measured
        if record["mode"] == "full":
            cells += [_number(row["kl"][kind]) for kind in kinds]
        cells += [_number(row["sensitivity"]), row["choice"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "outside_window is the attention mass a window cannot see; \"of which first token\" is the part of "
              "it on token 0, an attention sink, so the rest is distant content that a window discards.", ""]
    lines += distant_content_warning(layers)
    if "headwise_kv_heads" in record:
        kept = ", ".join(f"{layer}: {heads}" for layer, heads in record["headwise_kv_heads"].items())
        lines += [f"--heads {settings['heads']}: the replaced layers are head-wise; each keeps as attention the KV "
                  f"heads whose removal costs its attention output most (layer: KV heads) {kept}. The mixer and "
                  "sensitivity columns were scored for whole layers, before the head split.", ""]
    if record["mode"] == "full":
        lines.append("Sensitivity = the lowest KL(teacher||model) in nats/token over the allowed mixers, with only that "
                     "layer replaced and fitted layer-locally.")
        if "comparison" in record:
            lines += ["Whole plans with every replaced layer fitted the same way:", "",
                      "| plan | KL(teacher‖hybrid) | ppl ratio |", "|---|---|---|"]
            lines += [f"| {c['name']} | {_number(c['kl'])} | {c['ppl_ratio']:.4f} |" for c in record["comparison"]]
        else:
            lines.append(f"Chosen from the scores in {record['rescored_from']}; whole plans were not re-measured.")
        lines += ["", "How well each proxy ranks the layers like the measured scores (Spearman's rho):", "",
                  "| proxy | " + " | ".join(["sensitivity", *kinds]) + " |", "|---|" + "---|" * (len(kinds) + 1)]
        for name, row in record["proxy_agreement"].items():
            lines.append(f"| {name} | " + " | ".join(_number(row[t]) for t in ["sensitivity", *kinds]) + " |")
        lines += ["", f"Check: the residual-stream replay reproduces the teacher to KL {record['reference_kl']:.2e}."]
        if settings.get("recurrent_rope"):
            lines.append("Mamba2 / GDN candidates were scored rotating by RoPE: convert with --recurrent-rope.")
        if "sliding_attention" in kinds:
            window, length = settings["window"], settings["seq_len"]
            if settings.get("sink_tokens"):
                lines.append(f"Windows were scored keeping the first {settings['sink_tokens']} tokens: convert with "
                             f"--sink-tokens {settings['sink_tokens']}.")
            lines.append(f"Note: a {window}-token window changes only the last {length - window} tokens of each "
                         f"{length}-token block, so sliding_attention's KL holds for this length; for longer contexts "
                         "rerun with a larger --seq-len.")
    else:
        sinks = settings.get("sink_tokens", 0)
        where = f" and off the first token (windows keep the first {sinks} tokens)" if sinks else ""
        lines.append(f"Sensitivity = the {settings['ranking']} proxy ranking (fast mode: no layer was fitted); a layer "
                     f"gets a sliding window where at most {settings['swa_threshold']} of its attention mass lies "
                     f"outside the window{where}.")
    lines += ["", f"Calibration: {record['calibration']}. Device {settings['device']}, {settings['dtype']}, "
                  f"seed {settings['seed']}; {record['wall_seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def score_chart(record: dict) -> bytes:
    """PNG: per-layer scores per mixer (full mode) or the proxy sensitivity (fast mode) over the normalized proxies;
    kept attention layers shaded, and each layer's planned mixer written above the top panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = record["layers"]
    x = [row["layer"] for row in layers]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.35 * len(x) + 3), 7), sharex=True)
    if record["mode"] == "full":
        for kind in record["settings"]["mixers"]:
            top.plot(x, [max(row["kl"][kind], 1e-6) for row in layers], "o-", color=COLORS[kind], label=kind,
                     markersize=4)
        top.set_yscale("log")
        top.set_ylabel("KL(teacher||model), only this layer replaced")
    else:
        top.bar(x, [row["sensitivity"] for row in layers], color="tab:gray", label=record["settings"]["ranking"])
        top.set_ylabel("proxy sensitivity")
    for name in PROXY_NAMES:
        values = [row["proxies"][name] for row in layers]
        peak = max(abs(v) for v in values) or 1.0
        bottom.plot(x, [v / peak for v in values], ".-", color=PROXY_COLORS[name], label=f"{name} (max {peak:.3g})")
    bottom.set_ylabel("proxy / its max")
    bottom.set_ylim(0, 1.05)
    bottom.set_xticks(x)
    bottom.set_xlabel("layer")
    for axis in (top, bottom):
        for i, kind in enumerate(record["layer_types"]):
            if kind == "full_attention":
                axis.axvspan(i - 0.45, i + 0.45, color="tab:blue", alpha=0.15, linewidth=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    for i, kind in enumerate(record["layer_types"]):
        top.annotate(SHORT_NAMES[kind], (i, 1.01), xycoords=("data", "axes fraction"), ha="center", fontsize=8,
                     color="tab:blue" if kind == "full_attention" else COLORS[kind])
    top.set_title(f"{record['teacher']['name']}: {record['budget']} attention layers kept (shaded)", pad=16)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_folder(out_dir: Path, record: dict, overwrite: bool) -> None:
    """plan.json, report.md and scores.png, written to a hidden sibling folder that is renamed into place whole."""
    with staged_folder(out_dir, replace=overwrite) as staging:
        (staging / "plan.json").write_text(json.dumps(record, indent=2) + "\n")
        (staging / "report.md").write_text(markdown_report(record))
        (staging / "scores.png").write_bytes(score_chart(record))
