"""Triton helpers shared by the kernels: autotuning and the loop over chunks, both aware of the CPU interpreter.

Whether Triton runs interpreted (TRITON_INTERPRET=1, the CPU tests) is decided once, at import; the tests set the
variable before anything imports triton.
"""

import contextlib
import itertools
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def configs(BV: tuple[int, ...], num_warps: tuple[int, ...], num_stages: tuple[int, ...]) -> list[triton.Config]:
    """Every combination of value tile BV, warp count and pipeline depth; the first one is what the interpreter runs."""
    grid = itertools.product(BV, num_warps, num_stages)
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv, w, s in grid]


def autotune(configs: list[triton.Config], key: list[str], prune=None):
    """`triton.autotune` over `configs`, re-tuned for every new value of the `key` arguments (and argument dtypes).

    `prune(configs, named_args, **launch_kwargs)`, when given, drops the configs that are not safe for this launch
    before any is benchmarked (Triton's early_config_prune); it must leave at least one.
    Under the interpreter only the first config is kept: autotuning would run every config on the CPU, which makes
    the tests several times slower and measures nothing. No reset/restore hooks are set, so only kernels that never
    read what they write (and use no atomics) may be tuned with this: every config run must leave the same outputs.
    """
    def wrap(fn):
        prune_configs_by = {"early_config_prune": prune} if prune else None
        tuned = configs[:1] if INTERPRET else configs
        tuner = triton.autotune(configs=tuned, key=key, prune_configs_by=prune_configs_by)(fn)
        tuner.all_configs = configs  # every config, also under the interpreter, for `pinned`
        return tuner

    return wrap


@contextlib.contextmanager
def pinned(kernel, config: triton.Config):
    """Within the block, `kernel` (made by `autotune`) runs `config` alone, without benchmarking: lets the tests run
    every config, on the GPU and under the interpreter alike."""
    saved = kernel.configs
    kernel.configs = [config]  # the Autotuner skips tuning when it holds a single config
    try:
        yield
    finally:
        kernel.configs = saved


def _interpreted_range(n):
    # The Triton 3.6 interpreter holds every scalar as a 1-element numpy array; range() calls int() on it, which
    # numpy >= 2.4 refuses for arrays with ndim > 0. So read the element.
    return range(n.handle.data.item() if isinstance(n, tl.tensor) else n)


# `for i in chunk_range(n)` with a runtime bound n: on the GPU a tl.range loop, which Triton software-pipelines
# (a `while` loop it does not); under the interpreter a Python range.
chunk_range = _interpreted_range if INTERPRET else tl.range
