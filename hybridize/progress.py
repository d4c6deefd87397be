"""The one progress bar of long-running stages (distillation steps, analyzer fits): a tqdm on stderr."""

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, initial: int, description: str, enabled: bool):
    """tqdm shows steps done, the rate and the ETA; the trainer adds loss and tokens/s as a postfix."""
    return tqdm(total=total, initial=initial, desc=description, unit="step", disable=not enabled,
                dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
