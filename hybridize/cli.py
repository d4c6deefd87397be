"""The `hybridize` console script: one entry point, one module per subcommand."""

import argparse
import importlib
import sys

from transformers.utils import logging as transformers_logging

from . import __version__
from .errors import UserError

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "convert": ("hybridize.convert.cli", "initialize a hybrid from a teacher and a plan"),
    "analyze": ("hybridize.analyze.cli", "score each attention layer and choose a plan under a budget"),
    "distill": ("hybridize.distill.cli", "run a distillation recipe (single process; use accelerate launch for more)"),
    "eval": ("hybridize.evaluate.eval_cli", "compare a hybrid with its teacher on held-out text and recall tests"),
    "bench": ("hybridize.evaluate.bench_cli", "time prefill and decode of a hybrid and its teacher side by side"),
    "push": ("hybridize.publish.cli", "write a model card and remote code, then upload to the Hugging Face Hub"),
    "demo": ("hybridize.demo", "convert the embedded teacher and show what the toolkit does, on CPU"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help, unless the help already gives it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is False
                or action.default in (None, [], ()) or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported, so `--help` and each command start fast."""
    parser = argparse.ArgumentParser(prog="hybridize", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hybridize {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    # Our commands print their own progress; transformers' per-file progress output would bury it (and user errors) in noise.
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except UserError as err:
        print(f"hybridize {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hybridize {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
