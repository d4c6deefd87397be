"""How the kernel benchmarks time a call, and the copy bandwidth of the GPU at hand that bandwidth shares are of."""

import torch
import triton

GIB = 1 << 30


def time_ms(fn) -> float:
    """Median ms of fn() on the current CUDA device, by triton.testing.do_bench: one first call (autotuning,
    compilation), 25 ms of warm-up calls, then 100 ms of calls each timed by CUDA events with L2 flushed before it."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device: torch.device, nbytes: int = 2 * GIB) -> tuple[float, int]:
    """(bytes/s, bytes copied) of a device-to-device copy, counting the bytes read and the bytes written.

    The copy shrinks to a quarter of the free memory on a GPU that has less than 8 GiB free.
    """
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = min(nbytes, free // 4)
    ms = _copy_ms(nbytes, device)
    torch.cuda.empty_cache()  # the two buffers are freed on return; give their memory back to the cases
    return 2 * nbytes / (ms * 1e-3), nbytes


def _copy_ms(nbytes: int, device: torch.device) -> float:
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return time_ms(lambda: target.copy_(source))
