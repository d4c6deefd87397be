"""`hybridize analyze --scores DIR/plan.json`: a new budget or new constraints over an earlier analysis's scores.

Scoring takes minutes on a GPU and choosing takes milliseconds, so a sweep over budgets scores once. The per-layer
scores, the proxies and their agreement carry over unchanged; the earlier whole-plan comparison was for the earlier
budget, so it is dropped rather than shown next to a plan it does not describe.
"""

import dataclasses
import json
from pathlib import Path

from ..atomic import check_output_folder
from ..errors import UserError
from .proxies import PROXY_NAMES
from .report import markdown_report, write_folder
from .select import choose_plan, parse_budget


def read_scores(path: Path) -> dict:
    """The record of an earlier `hybridize analyze` (its plan.json), or one clear line."""
    try:
        record = json.loads(Path(path).read_text())
        if record["mode"] not in ("full", "fast") or not record["layers"]:
            raise ValueError("no layers")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--scores {path}: not a plan.json written by hybridize analyze ({err})") from err
    return record


def reselect_to_folder(scores_path: Path, settings, out_dir: Path, *, overwrite: bool = False, log=print) -> dict:
    """Choose a plan for `settings` (budget, constraints, fast-mode ranking) from the scores in `scores_path`."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite=overwrite)
    record = read_scores(scores_path)
    layers = record["layers"]
    constraints = settings.constraints
    budget = parse_budget(settings.budget, len(layers))
    constraints.check_budget(budget, len(layers))
    proxies = {name: [row["proxies"][name] for row in layers] for name in PROXY_NAMES}
    proxies["first_token"] = [row.get("first_token") for row in layers]
    measured_sinks = record["settings"].get("sink_tokens", 0)
    if record["mode"] == "full" and settings.sink_tokens != measured_sinks:
        raise UserError(f"--scores {scores_path} measured windows with {measured_sinks} sink tokens; "
                        f"--sink-tokens {settings.sink_tokens} needs a new analysis")
    measured_rope = record["settings"].get("recurrent_rope", False)
    if record["mode"] == "full" and settings.recurrent_rope != measured_rope:
        raise UserError(f"--scores {scores_path} measured Mamba2 / GDN candidates with recurrent_rope="
                        f"{measured_rope}; the other setting needs a new analysis")
    kl = None
    if record["mode"] == "full":
        missing = [m for m in constraints.mixers if m not in layers[0]["kl"]]
        if missing:
            raise UserError(f"--scores {scores_path} has no scores for {', '.join(missing)}; rerun the analysis")
        kl = {m: [row["kl"][m] for row in layers] for m in constraints.mixers}
    sensitivity, _, plan = choose_plan(budget, constraints, proxies, kl, settings.ranking, settings.swa_threshold,
                                       settings.sink_tokens)
    chosen = {
        **{k: v for k, v in record.items() if k != "comparison"},
        "layer_types": plan,
        "budget": budget,
        "rescored_from": str(scores_path),
        "settings": {**record["settings"], **dataclasses.asdict(constraints), "budget": settings.budget,
                     "ranking": settings.ranking, "swa_threshold": settings.swa_threshold,
                     "sink_tokens": settings.sink_tokens, "recurrent_rope": settings.recurrent_rope},
        "layers": [{**row, "choice": plan[i], "sensitivity": sensitivity[i]} for i, row in enumerate(layers)],
    }
    write_folder(out_dir, chosen, overwrite)
    log(markdown_report(chosen))
    log(f"wrote {out_dir}/plan.json, report.md, scores.png (chosen from the scores in {scores_path})")
    return chosen
