"""Where GPU time goes: the CUDA kernels of a callable, by total device time (run.py --profile, profile_decode.py)."""

import time

import torch
from torch.profiler import ProfilerActivity, profile


def host_and_wall_ms(fn, repeats: int) -> tuple[float, float]:
    """(host, wall) ms per call of fn over `repeats` back-to-back calls, L2 left warm.

    host: the time to return from the calls, before waiting for the GPU; wall: until the GPU has finished them. Host
    close to wall means the GPU waits on the host (launch and Python overhead), not the other way round.
    """
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    queued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (queued - start) * 1e3 / repeats, (done - start) * 1e3 / repeats


def print_kernel_table(title: str, fn, *, repeats: int = 3, rows: int = 25, warm_up: bool = True) -> None:
    """Run fn once to warm up (autotuning, compilation) unless told not to, then `repeats` times under the profiler.

    Prints each kernel's device ms per call, its share, and its launches per call; with a warm-up, also the host and
    wall ms per call of `repeats` unprofiled calls (`host_and_wall_ms`), which the kernel total is a part of, and
    where that host time goes (`print_host_rows`).
    """
    if warm_up:
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels = print_kernels(title, prof, repeats)
    if warm_up:
        host, wall = host_and_wall_ms(fn, repeats)
        print(f"   unprofiled: {host:.3f} ms host, {wall:.3f} ms wall per call")
    print_rows(kernels, repeats, rows)
    if warm_up:
        print_host_rows(fn, repeats)


def print_host_rows(fn, repeats: int, rows: int = 12) -> None:
    """The host's side of `repeats` calls: the operators and CUDA runtime / driver calls with the most self time.

    A synchronizing call (cudaStreamSynchronize, a device-to-host copy) shows as one long row, where launch overhead
    is many short cudaLaunchKernel / cuLaunchKernelEx rows; what the rows leave of the host time is Python.
    """
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)  # us over all repeats
    print(f"   host, profiled: {total / repeats / 1e3:.3f} ms per call in operators and runtime calls")
    for e in events[:rows]:
        print(f"  {e.self_cpu_time_total / repeats / 1e3:8.3f} ms host  x{e.count // repeats:<4d} {e.key[:90]}")


def print_kernels(title: str, prof, repeats: int) -> list:
    """The title line of a finished profile (kernel ms and launches per call); returns its kernels, longest first."""
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in kernels)  # us over all repeats
    launches = sum(e.count for e in kernels) // repeats
    print(f"== {title}: {total / repeats / 1e3:.3f} ms of kernels per call, {launches} launches")
    return kernels


def print_rows(kernels: list, repeats: int, rows: int) -> None:
    """The first `rows` kernels: device ms per call, share of all kernel time, launches per call, name."""
    total = sum(e.device_time_total for e in kernels)
    for e in kernels[:rows]:
        print(f"  {e.device_time_total / repeats / 1e3:8.3f} ms  {e.device_time_total / total:6.1%}  "
              f"x{e.count // repeats:<4d} {e.key[:90]}")
