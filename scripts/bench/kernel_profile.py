"""Where GPU time goes: the CUDA kernels of a callable, by total device time (run.py --profile, profile_decode.py)."""

import torch
from torch.profiler import ProfilerActivity, profile


def print_kernel_table(title: str, fn, *, repeats: int = 3, rows: int = 25, warm_up: bool = True) -> None:
    """Run fn once to warm up (autotuning, compilation) unless told not to, then `repeats` times under the profiler.

    Prints each kernel's device ms per call, its share, and its launches per call.
    """
    if warm_up:
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in kernels)  # us over all repeats
    print(f"== {title}: {total / repeats / 1e3:.3f} ms of kernels per call")
    for e in kernels[:rows]:
        print(f"  {e.device_time_total / repeats / 1e3:8.3f} ms  {e.device_time_total / total:6.1%}  "
              f"x{e.count // repeats:<4d} {e.key[:90]}")
