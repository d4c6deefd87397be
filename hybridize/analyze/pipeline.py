"""`analyze_to_folder`: teacher + budget -> DIR/plan.json (a plan `convert --plan` takes), report.md, scores.png.

Order of work:
1. load the teacher, resolve the budget and constraints (bad ones stop here, before any compute);
2. proxies from the teacher's attention maps on the held-out blocks (and the induction probe);
3. full mode only: capture the teacher's residual stream on the held-out blocks, fit every candidate mixer of
   every layer layer-locally on training blocks, then score each (layer, mixer) at model level;
4. choose the plan, compare it with evenly spaced plans (full mode), write everything at once.
"""

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..atomic import check_output_folder
from ..convert.build import check_teacher, convert_model, hybrid_config_from_teacher
from ..convert.plan import H2_CYCLE, resolve_plan, uniform_positions
from ..corpus import calibration_batch
from ..device import pick_device
from ..progress import progress_bar
from ..dtypes import DTYPES as ALL_DTYPES
from ..errors import UserError
from ..model.configuration_hybrid import HEADWISE_TYPES, WINDOW_MEMORY_TYPES
from ..teacher import load_teacher, teacher_identity
from .heads import check_heads, choose_kv_heads, headwise_plan, kv_head_scores
from .proxies import (
    FAST_RANKINGS, PROXY_NAMES, WINDOW_STATISTICS, attention_proxies, proxy_sensitivity, repeated_random_tokens,
    spearman,
)
from .report import markdown_report, write_folder
from .scores import (
    FitSettings, candidate_mixers, capture_held_out, fit_candidates, layer_scores, model_level, training_blocks,
)
from .select import Constraints, assign_mixers, choose_plan, parse_budget

# fp16 is left out: the candidate fits run under autocast, whose fp16 mode would need a gradient scaler.
DTYPES = {name: dtype for name, dtype in ALL_DTYPES.items() if name != "float16"}
INDUCTION_BLOCKS = 2
SEQ_LEN_WINDOWS = 4  # default calibration block: this many sliding windows (capped at the teacher's context)
WINDOWED_TYPES = ("sliding_attention", *WINDOW_MEMORY_TYPES)


@dataclass(frozen=True)
class AnalyzeSettings:
    """Everything that decides an analysis; docs/analyze.md says why each default is what it is.

    seq_len None means SEQ_LEN_WINDOWS times the sliding window of a converted sliding_attention layer (capped at the
    teacher's context), so that three quarters of every block's queries have keys outside the window. eval_blocks
    counts held-out blocks per text domain.
    """

    budget: str
    constraints: Constraints = field(default_factory=Constraints)
    fast: bool = False
    ranking: str = "combined"
    swa_threshold: float = 0.05
    sink_tokens: int = 0  # windows are scored as windows that keep the first sink_tokens tokens
    recurrent_rope: bool = False  # Mamba2 / GDN candidates are scored rotating by RoPE (convert --recurrent-rope)
    heads: int | None = None  # replaced layers become head-wise layers keeping this many KV heads (analyze/heads.py)
    seq_len: int | None = None
    eval_blocks: int = 2
    fit: FitSettings = field(default_factory=FitSettings)
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        checks = (
            (self.ranking in FAST_RANKINGS,
             f"--ranking must be one of {', '.join(FAST_RANKINGS)}, got {self.ranking!r}"),
            (0.0 <= self.swa_threshold <= 1.0, f"--swa-threshold must be in [0, 1], got {self.swa_threshold}"),
            (self.sink_tokens >= 0, f"--sink-tokens must be >= 0, got {self.sink_tokens}"),
            (self.seq_len is None or self.seq_len >= 4, f"--seq-len must be >= 4, got {self.seq_len}"),
            (self.eval_blocks >= 1, f"--eval-blocks must be >= 1, got {self.eval_blocks}"),
            (self.fit.steps >= 1, f"--fit-steps must be >= 1, got {self.fit.steps}"),
            (self.fit.batch_blocks >= 1, f"--fit-batch must be >= 1, got {self.fit.batch_blocks}"),
            (self.fit.lr > 0, f"--lr must be > 0, got {self.fit.lr}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
        )
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def analyze_to_folder(
    teacher_name: str | None, settings: AnalyzeSettings, out_dir: str | Path, *, overwrite: bool = False, log=print
) -> dict:
    """Analyze the teacher, write out_dir/{plan.json, report.md, scores.png}, and return plan.json's record."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite=overwrite)
    device, dtype = pick_device(settings.device), DTYPES[settings.dtype]
    teacher, tokenizer = load_teacher(teacher_name, dtype=dtype, device=device)
    check_teacher(teacher.config)
    num_layers = teacher.config.num_hidden_layers
    budget = parse_budget(settings.budget, num_layers)
    constraints = settings.constraints
    constraints.check_budget(budget, num_layers)
    if settings.heads is not None:
        check_heads(settings.heads, teacher.config.num_key_value_heads)
    window = hybrid_config_from_teacher(teacher.config, ["full_attention"] * num_layers).sliding_window
    # At 2 x window, sliding windows won all 22 replaced layers of SmolLM2 and then lost long-context recall after
    # distillation (docs/results.md): the block must be long enough for the window's loss to show.
    seq_len = settings.seq_len or min(SEQ_LEN_WINDOWS * window, teacher.config.max_position_embeddings)
    windowed = [m for m in constraints.mixers if m in WINDOWED_TYPES]
    if windowed and seq_len <= window:
        raise UserError(f"--seq-len {seq_len} is not longer than the sliding window ({window}): {', '.join(windowed)} "
                        "would see every token as full attention does; use a longer --seq-len or drop it from --mixers")

    held_ids = calibration_batch(tokenizer, seq_len=seq_len, blocks_per_domain=settings.eval_blocks).to(device)
    probe_ids = repeated_random_tokens(teacher.config.vocab_size, seq_len, INDUCTION_BLOCKS, settings.seed).to(device)
    with progress_bar(len(held_ids) + len(probe_ids), 0, "attention maps", True) as bar:
        proxies = attention_proxies(teacher, held_ids, probe_ids, window, bar)
    calibration = (f"{held_ids.numel()} held-out tokens ({len(held_ids)} blocks x {seq_len}) for the proxies"
                   f"{'' if settings.fast else ' and KL'}, induction probe {len(probe_ids)} x {2 * (seq_len // 2)} "
                   "random tokens")
    head_scores = kv_head_scores(teacher, held_ids, list(range(num_layers))) if settings.heads else None
    extra: dict = {}
    kl = None
    if not settings.fast:
        scored = _measure(teacher, tokenizer, held_ids, seq_len, settings, dtype)
        del teacher  # the candidates and the full-attention base hold all the weights scoring needs
        kl = {k: v["kl"] for k, v in scored["scores"].items()}
        calibration += f"; {scored['fit_tokens']} training tokens for the layer-local fits"
    sensitivity, best, plan = choose_plan(budget, constraints, proxies, kl, settings.ranking, settings.swa_threshold,
                                          settings.sink_tokens)
    if not settings.fast:
        extra = _full_mode_record(scored, plan, budget, best, sensitivity, proxies, constraints, dtype)
    if head_scores is not None:
        plan = headwise_plan(plan, constraints.mixers)
        extra["headwise_kv_heads"] = choose_kv_heads(
            {i: head_scores[i] for i, kind in enumerate(plan) if kind in HEADWISE_TYPES}, settings.heads)

    resolved = {**dataclasses.asdict(settings), "seq_len": seq_len, "device": str(device), "window": window}
    resolved.update(resolved.pop("constraints"))
    resolved.update({f"fit_{k}": v for k, v in resolved.pop("fit").items()})
    layers = []
    for i in range(num_layers):
        row = {"layer": i, "choice": plan[i], "sensitivity": sensitivity[i],
               "proxies": {name: proxies[name][i] for name in PROXY_NAMES},
               **{name: proxies[name][i] for name in WINDOW_STATISTICS}}
        if head_scores is not None:
            row["kv_head_scores"] = head_scores[i]
        if not settings.fast:
            for name in ("kl", "ppl_ratio", "rel_error", "fit_mse"):
                row[name] = {kind: values[name][i] for kind, values in scored["scores"].items()}
        layers.append(row)
    record = {
        "hybridize_version": __version__,
        "mode": "fast" if settings.fast else "full",
        "teacher": teacher_identity(teacher_name, record_folder=out_dir),
        "layer_types": plan,
        "budget": budget,
        "settings": resolved,
        "calibration": calibration,
        "layers": layers,
        **extra,
        "wall_seconds": time.perf_counter() - started,
    }
    write_folder(out_dir, record, overwrite)
    log(markdown_report(record))
    sinks = ["--sink-tokens", str(settings.sink_tokens)] if settings.sink_tokens else []
    rope = ["--recurrent-rope"] if settings.recurrent_rope else []
    convert = " ".join(["hybridize convert", *([teacher_name] if teacher_name else []), "--plan",
                        str(out_dir / "plan.json"), *sinks, *rope, "--out", "DIR"])
    log(f"wrote {out_dir}/plan.json, report.md, scores.png; analyzed in {record['wall_seconds']:.1f} s (wall)")
    log(f"next: {convert}")
    return record


def _measure(teacher, tokenizer, held_ids, seq_len: int, settings: AnalyzeSettings, dtype) -> dict:
    """Fit every candidate of every layer, then score each with only its layer replaced."""
    num_layers = teacher.config.num_hidden_layers
    device = held_ids.device
    base = convert_model(teacher, ["full_attention"] * num_layers, seed=settings.seed).to(device)
    held_out = capture_held_out(teacher, held_ids)
    candidates = {kind: candidate_mixers(teacher, kind, settings.seed, settings.sink_tokens, settings.recurrent_rope)
                  for kind in settings.constraints.mixers}
    fit = settings.fit
    blocks = training_blocks(tokenizer, seq_len, fit.steps * fit.batch_blocks)
    with progress_bar(fit.steps, 0, f"layer-local fits ({len(candidates)} x {num_layers} mixers)", True) as bar:
        fit_mse = fit_candidates(teacher, base, candidates, blocks, fit, dtype, bar)
    with progress_bar(len(candidates) * num_layers, 0, "model-level scores", True) as bar:
        scores = layer_scores(base, held_out, candidates, dtype, bar)
    for kind in candidates:
        scores[kind]["fit_mse"] = fit_mse[kind]
    return {"base": base, "held_out": held_out, "candidates": candidates, "scores": scores,
            "fit_tokens": blocks.numel()}


def _full_mode_record(scored: dict, plan, budget: int, best, sensitivity, proxies, constraints, dtype) -> dict:
    """Whole-plan KL of the chosen plan and of evenly spaced ones, the proxies' rank agreement, and a replay check."""
    base, held_out, candidates = scored["base"], scored["held_out"], scored["candidates"]
    num_layers = len(plan)
    kept_evenly = uniform_positions(num_layers, budget) if budget else []
    plans = {"chosen": plan, "evenly spaced, same mixer rule": assign_mixers(kept_evenly, best, constraints)}
    if set(H2_CYCLE) <= set(constraints.mixers):
        plans[f"h2:{budget} (convert's pattern)"] = resolve_plan(f"h2:{budget}", num_layers)
    comparison = []
    for name, layer_types in plans.items():
        swaps = {i: candidates[kind][i] for i, kind in enumerate(layer_types) if kind != "full_attention"}
        kl, ppl_ratio = model_level(base, held_out, swaps, dtype)
        comparison.append({"name": name, "layer_types": layer_types, "kl": kl, "ppl_ratio": ppl_ratio})
    targets = {"sensitivity": sensitivity, **{kind: scored["scores"][kind]["kl"] for kind in candidates}}
    predictors = {**{name: proxy_sensitivity(proxies, name) for name in PROXY_NAMES},
                  "combined": proxy_sensitivity(proxies, "combined")}
    agreement = {name: {target: spearman(values, measured) for target, measured in targets.items()}
                 for name, values in predictors.items()}
    return {"comparison": comparison, "proxy_agreement": agreement,
            "reference_kl": model_level(base, held_out, {}, dtype)[0]}
