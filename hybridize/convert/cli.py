"""`hybridize convert [MODEL] --plan PLAN --out DIR`: initialize a hybrid from a teacher and report how close it
starts."""

import argparse

from ..errors import UserError
from .init import InitOptions
from .io import convert_to_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="teacher: HF id, local folder, or alias (default: the embedded smollm2-135m)")
    parser.add_argument("--plan", required=True,
                        help="plan.json, a compact spec ('full_attention:0,7 gated_deltanet:rest'), "
                             "uniform:K[:MIXER], h2:K or all:MIXER")
    parser.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed for parameters attention has no counterpart of")
    parser.add_argument("--sink-tokens", type=int, default=0, metavar="S",
                        help="sliding windows also keep each sequence's first S tokens (attention sinks; "
                             "docs/model.md); default 0, plain windows")
    defaults = InitOptions()
    parser.add_argument("--init-conv", default=defaults.conv, choices=("identity", "random"))
    parser.add_argument("--init-gate", default=defaults.gate, choices=("zero", "random"))
    parser.add_argument("--init-decay", default=defaults.decay, choices=("slow", "random"))


def run(args: argparse.Namespace) -> int:
    options = InitOptions(conv=args.init_conv, gate=args.init_gate, decay=args.init_decay)
    if args.sink_tokens < 0:
        raise UserError(f"--sink-tokens must be >= 0, got {args.sink_tokens}")
    convert_to_folder(args.model, args.plan, args.out, seed=args.seed, overwrite=args.overwrite, options=options,
                      sink_tokens=args.sink_tokens)
    return 0
