"""The one place a `--device` flag becomes a torch.device: the GPU by default when there is one, else the CPU."""

import torch

from .errors import UserError


def pick_device(name: str | None) -> torch.device:
    """The named device, checked now so that a typo or a missing GPU is one line, not a traceback mid-run."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a torch device ({err})") from err
    gpus = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise UserError(f"--device {name}: this machine has {gpus} CUDA GPU(s)")
    return device
