"""`hybridize analyze [MODEL] --budget K --out DIR`: score each attention layer and choose a plan under the budget."""

import argparse

from ..errors import UserError
from .pipeline import DTYPES, SEQ_LEN_WINDOWS, AnalyzeSettings, analyze_to_folder
from .reselect import read_scores, reselect_to_folder
from .proxies import FAST_RANKINGS
from .scores import FitSettings
from .select import CANDIDATE_MIXERS, DEFAULT_MIXERS, PATTERNS, Constraints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fit = FitSettings()
    parser.add_argument("model", nargs="?", default=None,
                        help="teacher: HF id, local folder, or alias (default: the embedded smollm2-135m)")
    parser.add_argument("--budget", required=True,
                        help="attention layers to keep: a count K, or a fraction of the layers such as 0.25")
    parser.add_argument("--out", required=True, help="output folder (refused if not empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing the files analyze writes (other files are kept)")
    parser.add_argument("--scores", default=None, metavar="PLAN_JSON",
                        help="choose from the scores of an earlier analysis (its plan.json) instead of scoring: "
                             "seconds, for another budget or other constraints; the teacher and mode come from it")
    parser.add_argument("--fast", action="store_true",
                        help="rank layers by attention-map proxies only, no fitting: 5 minutes for a 135M model on "
                             "2 busy CPU cores at the default --seq-len (docs/analyze.md, Measured)")
    parser.add_argument("--mixers", default=None,
                        help=f"comma-separated mixers a replaced layer may get, of {','.join(CANDIDATE_MIXERS)} "
                             f"(default: {','.join(DEFAULT_MIXERS)}; "
                             "with --scores, those the earlier run scored)")
    parser.add_argument("--pattern", default="best", choices=PATTERNS,
                        help="best: each replaced layer gets its best-scoring mixer; h2: replaced layers cycle "
                             "mamba2 -> gated_deltanet -> sliding_attention by depth")
    parser.add_argument("--no-attention-first", type=int, default=0, metavar="N",
                        help="never keep attention in layers 0..N-1")
    parser.add_argument("--min-spacing", type=int, default=1, metavar="S",
                        help="kept attention layers are at least S layers apart")
    parser.add_argument("--ranking", default="combined", choices=FAST_RANKINGS,
                        help="--fast: the proxy that ranks layers (combined: the mean of all proxies' ranks)")
    parser.add_argument("--swa-threshold", type=float, default=0.05,
                        help="--fast: give a layer a sliding window when at most this share of its attention mass "
                             "lies outside the window")
    parser.add_argument("--sink-tokens", type=int, default=0, metavar="S",
                        help="score sliding windows that also keep the first S tokens, as `hybridize convert "
                             "--sink-tokens S` builds them (default 0, plain windows)")
    parser.add_argument("--recurrent-rope", action="store_true",
                        help="score Mamba2 / GDN candidates that rotate by RoPE, as `hybridize convert "
                             "--recurrent-rope` builds them (default off)")
    parser.add_argument("--heads", type=int, default=None, metavar="K",
                        help="every replaced layer becomes a head-wise layer that keeps its K KV heads (with their "
                             "query heads) whose removal costs its attention output most as attention; the other "
                             "heads become heads of the layer's chosen recurrent mixer: Mamba2 (headwise_mamba2) for "
                             "mamba2 and window_mamba2, Gated DeltaNet (headwise_gated_deltanet) for the GDN types, "
                             "and for a sliding window Gated DeltaNet unless --mixers allows only Mamba2 "
                             "(e.g. --mixers mamba2 --heads 1: all Mamba2)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens per calibration block (default: {SEQ_LEN_WINDOWS} times the sliding window, "
                             f"capped at the teacher's context: {SEQ_LEN_WINDOWS * 512} for a 512-token window)")
    parser.add_argument("--eval-blocks", type=int, default=2, help="held-out blocks per text domain (default 2)")
    parser.add_argument("--fit-steps", type=int, default=fit.steps, help=f"layer-local fit steps (default {fit.steps})")
    parser.add_argument("--fit-batch", type=int, default=fit.batch_blocks,
                        help=f"training blocks per fit step (default {fit.batch_blocks})")
    parser.add_argument("--lr", type=float, default=fit.lr, help=f"layer-local fit learning rate (default {fit.lr})")
    parser.add_argument("--seed", type=int, default=0, help="seed for mixer init and the induction probe")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                        help="teacher dtype; bfloat16 also runs the fits under autocast (fp32 weights)")


def _mixers(args: argparse.Namespace) -> tuple[str, ...]:
    if args.mixers is not None:
        return tuple(m.strip() for m in args.mixers.split(",") if m.strip())
    return tuple(read_scores(args.scores)["settings"]["mixers"]) if args.scores else DEFAULT_MIXERS


def run(args: argparse.Namespace) -> int:
    constraints = Constraints(
        mixers=_mixers(args),
        pattern=args.pattern,
        no_attention_first=args.no_attention_first,
        min_spacing=args.min_spacing,
    )
    settings = AnalyzeSettings(
        budget=args.budget,
        constraints=constraints,
        fast=args.fast,
        ranking=args.ranking,
        swa_threshold=args.swa_threshold,
        sink_tokens=args.sink_tokens,
        recurrent_rope=args.recurrent_rope,
        heads=args.heads,
        seq_len=args.seq_len,
        eval_blocks=args.eval_blocks,
        fit=FitSettings(steps=args.fit_steps, batch_blocks=args.fit_batch, lr=args.lr),
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
    )
    if args.scores is None:
        analyze_to_folder(args.model, settings, args.out, overwrite=args.overwrite)
    elif args.heads is not None:
        raise UserError("--heads scores each layer's KV heads on the teacher: it needs a new analysis, not --scores")
    elif args.model is not None or args.fast:
        raise UserError("--scores takes the teacher and the mode from its file: drop MODEL and --fast")
    else:
        reselect_to_folder(args.scores, settings, args.out, overwrite=args.overwrite)
    return 0
