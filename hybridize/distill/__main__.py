"""`python -m hybridize.distill RECIPE`: what `accelerate launch -m hybridize.distill` starts on every process."""

import argparse
import os
import sys

from transformers.utils import logging as transformers_logging

from hybridize.distill.cli import add_arguments, run
from hybridize.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridize.distill", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    # As in the `hybridize` command: our own progress lines, not transformers' per-file bars and notices.
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    # Every process meets the same error; one line from the first process is enough.
    first = int(os.environ.get("RANK", "0")) == 0
    try:
        return run(args)
    except UserError as err:
        if first:
            print(f"hybridize distill: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if first:
            print("hybridize distill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
