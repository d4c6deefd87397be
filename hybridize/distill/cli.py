"""`hybridize distill RECIPE`: run a distillation recipe (one process here; `accelerate launch -m hybridize.distill` for more)."""

import argparse

from ..errors import UserError
from .recipe import Recipe, apply_override, parse_recipe, read_recipe, smoke_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML file, e.g. recipes/smollm2-135m/gdn.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the output directory from its latest checkpoint")
    parser.add_argument("--out", "--output-dir", dest="out", metavar="DIR",
                        help="write the run here instead of the recipe's output_dir (--smoke: its output_dir-smoke)")
    parser.add_argument("--max-steps", type=int, metavar="N",
                        help="end each stage after N optimizer steps (the lr schedule still spans the full budget)")
    parser.add_argument("--smoke", action="store_true",
                        help="a CPU-sized run of the recipe: sequences of at most 128 tokens, 2 per step, "
                             "64 documents, checkpoints every step, into OUTPUT_DIR-smoke; implies --max-steps 2")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set stages.1.lr=5e-5 (repeatable; VALUE is YAML)")


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe file with --smoke, --set and --out applied, bound and checked."""
    raw = read_recipe(args.recipe)
    for assignment in (smoke_overrides(raw) if args.smoke else []) + args.overrides:
        apply_override(raw, assignment)
    if args.out:
        raw["output_dir"] = args.out
    elif args.smoke and isinstance(raw.get("output_dir"), str):
        # A smoke run of a recipe must not occupy (and so block) the folder its real run will use.
        raw["output_dir"] = raw["output_dir"].rstrip("/") + "-smoke"
    return parse_recipe(raw, f"recipe {args.recipe}")


def run(args: argparse.Namespace) -> int:
    recipe = build_recipe(args)
    max_steps = args.max_steps if args.max_steps is not None else (2 if args.smoke else None)
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {max_steps}")
    from .trainer import Trainer  # torch, accelerate and the models load only once the recipe is known to be good

    Trainer(recipe, resume=args.resume, max_steps=max_steps).run()
    return 0
