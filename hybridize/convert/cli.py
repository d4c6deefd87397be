"""`hybridize convert [MODEL] --plan PLAN --out DIR`: initialize a hybrid from a teacher and report how close it
starts."""

import argparse

from ..device import pick_device
from ..dtypes import DTYPES, parse_dtype
from ..errors import UserError
from .init import InitOptions
from .pipeline import CONVERT_DEFAULTS, convert_to_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="teacher: HF id, local folder, or alias (default: the embedded smollm2-135m)")
    parser.add_argument("--plan", required=True,
                        help="plan.json, a compact spec ('full_attention:0,7 gated_deltanet:rest'), "
                             "uniform:K[:MIXER], h2:K or all:MIXER")
    parser.add_argument("--out", required=True, help="output folder (refused if not empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing the files convert writes (other files are kept)")
    parser.add_argument("--seed", type=int, default=0, help="seed for parameters attention has no counterpart of")
    parser.add_argument("--sink-tokens", type=int, default=0, metavar="S",
                        help="sliding windows also keep each sequence's first S tokens (attention sinks; "
                             "docs/model.md); default 0, plain windows")
    parser.add_argument("--recurrent-rope", action="store_true",
                        help="Mamba2 / GDN layers rotate their C, B / q, k by RoPE, as the teacher's attention "
                             "rotates q, k (docs/model.md); default off")
    parser.add_argument("--memory-outside-window", action="store_true",
                        help="the memory branch of window + memory layers reads only the tokens that have left the "
                             "window, not every token so far (docs/model.md); default off")
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                        help="dtype of the written hybrid (default: the dtype the teacher's weights are stored in; "
                             "A_log, dt_bias and D stay float32 in every dtype)")
    parser.add_argument("--device", default=None,
                        help="where the teacher and the report's forwards run (default: cuda if available, else cpu)")
    defaults = CONVERT_DEFAULTS
    # What each choice does and why the defaults were picked: docs/conversion.md, "Init options".
    parser.add_argument("--init-conv", default=defaults.conv, choices=("identity", "random"),
                        help="short convolution of Mamba2 / GDN layers: identity passes each token through (then "
                             "SiLU); random is the mixer's own init, which mixes in neighbours")
    parser.add_argument("--init-gate", default=defaults.gate, choices=("zero", "random", "teacher"),
                        help="output gate of Mamba2 / GDN layers: teacher copies W_v into the gate and fits each "
                             "head's output scale to the teacher's attention output on calibration text; zero makes "
                             "each layer start as an exact skip (step-0 rel. error 1.0); random is a small random "
                             "projection")
    parser.add_argument("--init-decay", default=defaults.decay, choices=("slow", "random", "teacher"),
                        help="state decay of Mamba2 / GDN layers: teacher gives each head a half-life equal to the "
                             "teacher head's mean attention distance; slow starts every head near exp(-0.01) per "
                             "token (about 100 tokens of memory); random spreads heads over Mamba2's usual range")
    parser.add_argument("--init-beta", default=defaults.beta, choices=("half", "teacher"),
                        help="write strength of GDN layers: teacher sets each head's from its attention entropy "
                             "(0.7 for a sharp head down to 0.3 for a uniform one); half is 1/2 everywhere")
    parser.add_argument("--init-long-heads", type=float, default=defaults.long_memory_heads, metavar="SHARE",
                        help="with --init-decay teacher: the share of each layer's heads, those with the longest "
                             "mean attention distance, that get a 4096-token half-life instead (default 0: none)")
    parser.add_argument("--align-steps", type=int, default=defaults.align_steps, metavar="N",
                        help="after the init, N full-batch Adam steps of each Mamba2 / GDN mixer alone against the "
                             "teacher's attention output on calibration text (0: none)")


def run(args: argparse.Namespace) -> int:
    if args.align_steps < 0:
        raise UserError(f"--align-steps must be >= 0, got {args.align_steps}")
    options = InitOptions(conv=args.init_conv, gate=args.init_gate, decay=args.init_decay, beta=args.init_beta,
                          align_steps=args.align_steps, long_memory_heads=args.init_long_heads)
    if args.sink_tokens < 0:
        raise UserError(f"--sink-tokens must be >= 0, got {args.sink_tokens}")
    convert_to_folder(args.model, args.plan, args.out, seed=args.seed, overwrite=args.overwrite, options=options,
                      sink_tokens=args.sink_tokens, recurrent_rope=args.recurrent_rope,
                      memory_outside_window=args.memory_outside_window, dtype=args.dtype and parse_dtype(args.dtype),
                      device=pick_device(args.device))
    return 0
