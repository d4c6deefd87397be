"""Speed and memory of the hybrid against its teacher, in one run: prefill, time to first token, decode, cache bytes.

Paths measured at every (context, batch size):
- hybrid generate: `model.generate()` with the HybridCache, what a user gets with no extra work;
- hybrid fast:     fast_decode.StaticDecoder (static slots and states, the decode step as one CUDA graph);
- teacher generate: `model.generate()` with transformers' default dynamic cache;
- teacher static:  `model.generate()` with a StaticCache, which transformers compiles on a GPU
                   (torch.compile, mode "reduce-overhead", i.e. CUDA graphs): its fastest decode path.
"Context" is prompt + new tokens, so the last tokens are decoded at the stated context; prompts are random
token ids (speed does not depend on the text). Timings are medians of `repeats` runs after one warm-up. Each
`generate()` run is timed at its first new token too (a stopping criterion that never stops notes the time), so
time to first token and decode time (the N-1 tokens after it) come from the same run and are never negative.
"""

import gc
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import StaticCache, StoppingCriteria, StoppingCriteriaList

from ..dtypes import dtype_name
from ..errors import UserError
from ..model.compiling import allow_recompiles
from .common import format_table
from ..model.fast_decode import StaticDecoder
from .recall import default_lengths

PATHS = ("hybrid generate", "hybrid fast", "teacher generate", "teacher static")


def path_names(text: str) -> tuple[str, ...]:
    """argparse type for --paths: "hybrid-fast,teacher-static" (or the spaced names) -> PATHS entries."""
    return tuple(name.strip().replace("-", " ") for name in text.split(",") if name.strip())


def path_flag(name: str) -> str:
    """How a path is written on the command line: "hybrid fast" -> "hybrid-fast"."""
    return name.replace(" ", "-")


# Ratio names a --target may name: speed-ups must reach the target, shares of the teacher's must not exceed it.
AT_LEAST = ("decode_speedup", "prefill_speedup", "ttft_speedup")
AT_MOST = ("cache_ratio", "peak_mem_ratio")


@dataclass
class BenchSettings:
    contexts: tuple[int, ...] | None = None  # None: 1K, 2K, 4K, ... up to the teacher's context limit
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    new_tokens: int = 64
    repeats: int = 2
    paths: tuple[str, ...] = PATHS
    compile_fast: bool = True  # torch.compile the hybrid's decode step on a GPU (never on the CPU: slow, not the point)
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.paths) - set(PATHS)
        if unknown:
            raise UserError(f"unknown bench path {path_flag(sorted(unknown)[0])!r}; allowed: "
                            f"{','.join(map(path_flag, PATHS))}")
        if self.new_tokens < 2:
            raise UserError("--new-tokens must be at least 2 (decode speed is measured after the first token)")
        if self.contexts and min(self.contexts) <= self.new_tokens:
            raise UserError(f"every context must exceed --new-tokens ({self.new_tokens}): "
                            "a context counts prompt + new tokens")

    @classmethod
    def small(cls) -> "BenchSettings":
        return cls(contexts=(64, 128), batch_sizes=(1, 2), new_tokens=8, repeats=1)


def cache_nbytes(cache) -> int:
    """Bytes held by a transformers cache (DynamicCache, StaticCache) or a HybridCache."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


class _FirstTokenClock(StoppingCriteria):
    """Never stops generation; notes when it is first asked, which is right after the first new token.

    generate() already reads a flag from the device at every step, so the one sync here adds no other wait.
    """

    def __init__(self, device: torch.device):
        self.device, self.first_token_at = device, None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.first_token_at is None:
            _sync(self.device)
            self.first_token_at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _GeneratePath:
    """`generate()` greedy, never stopping at eos; `static` passes a fresh StaticCache of exactly the context."""

    def __init__(self, model, static: bool, pad_token_id: int):
        self.model, self.static, self.pad = model, static, pad_token_id

    def run(self, ids: torch.LongTensor, new_tokens: int, context: int, clock: _FirstTokenClock | None = None):
        cache = StaticCache(config=self.model.config, max_cache_len=context) if self.static else None
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=self.pad, past_key_values=cache, return_dict_in_generate=True,
            stopping_criteria=StoppingCriteriaList([clock] if clock else []),
        )
        return out.past_key_values

    def _timed_run(self, ids, new_tokens: int, context: int, device) -> tuple[float, float, object]:
        """(time to first token, time of the other new tokens, the cache) of one run."""
        clock = _FirstTokenClock(device)
        _sync(device)
        start = time.perf_counter()
        cache = self.run(ids, new_tokens, context, clock)
        _sync(device)
        end = time.perf_counter()
        return clock.first_token_at - start, end - clock.first_token_at, cache

    def measure(self, ids, new_tokens: int, context: int, repeats: int, device) -> dict:
        self.run(ids, new_tokens, context)  # warm-up (and, for the static path on a GPU, compilation)
        runs = [self._timed_run(ids, new_tokens, context, device) for _ in range(repeats)]
        return {"ttft": statistics.median(r[0] for r in runs), "decode": statistics.median(r[1] for r in runs),
                "cache_bytes": cache_nbytes(runs[-1][2])}


class _FastPath:
    def __init__(self, model, compile_step: bool):
        self.model, self.compile_step = model, compile_step

    def measure(self, ids, new_tokens: int, context: int, repeats: int, device) -> dict:
        compile_step = self.compile_step and device.type == "cuda"
        decoder = StaticDecoder(self.model, ids.shape[0], context, compile_step=compile_step)
        prefill, decode = [], []
        for _ in range(repeats + 1):  # the first round is the warm-up
            prefill.append(_timed(lambda: decoder.prefill(ids), device)[0])
            decode.append(_timed(lambda: decoder.decode(new_tokens - 1), device)[0])
        return {"ttft": statistics.median(prefill[1:]), "decode": statistics.median(decode[1:]),
                "cache_bytes": decoder.cache_nbytes(), "compiled": decoder.compiled,
                "cuda_graph": decoder.use_cuda_graph}


def _paths(student, teacher, settings: BenchSettings, pad_token_id: int) -> dict:
    makers = {
        "hybrid generate": lambda: _GeneratePath(student, False, pad_token_id),
        "hybrid fast": lambda: _FastPath(student, settings.compile_fast),
        "teacher generate": lambda: _GeneratePath(teacher, False, pad_token_id),
        "teacher static": lambda: _GeneratePath(teacher, True, pad_token_id),
    }
    return {p: makers[p]() for p in settings.paths if teacher is not None or p.startswith("hybrid")}


def measure_one(path, vocab_size: int, context: int, batch: int, settings: BenchSettings, device) -> dict:
    """One row: speeds in tokens/s, time to first token in s, peak GPU memory in GiB, cache bytes per sequence."""
    prompt_len = context - settings.new_tokens
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).to(device)
    if device.type == "cuda":
        gc.collect()  # the previous row's decoder (a reference cycle through its compiled step) holds GPU memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        m = path.measure(ids, settings.new_tokens, context, settings.repeats, device)
    return {key: m[key] for key in ("compiled", "cuda_graph") if key in m} | {
        "prefill_tok_s": batch * prompt_len / m["ttft"],
        "decode_tok_s": batch * (settings.new_tokens - 1) / m["decode"] if m["decode"] > 0 else None,
        "ttft_s": m["ttft"],
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "cache_bytes_per_seq": m["cache_bytes"] / batch,
    }


def run_bench(student, teacher, settings: BenchSettings, *, pad_token_id: int, log=print) -> dict:
    """{"settings", "device", "rows": [...], "ratios": [...]}; a configuration that runs out of GPU
    memory is recorded as such, and larger contexts at that batch size are then skipped for that path."""
    device = next(student.parameters()).device
    if device.type == "cuda":
        allow_recompiles()  # the teacher's static path compiles once per (batch, context) too
    limit = (teacher if teacher is not None else student).config.max_position_embeddings
    contexts = settings.contexts or default_lengths(limit)
    rows, out_of_memory = [], set()
    for name, path in _paths(student, teacher, settings, pad_token_id).items():
        model = path.model
        for batch in settings.batch_sizes:
            for context in contexts:
                row = {"path": name, "context": context, "batch": batch}
                if (name, batch) in out_of_memory:
                    rows.append(row | {"oom": True})
                    continue
                try:
                    row |= measure_one(path, model.config.vocab_size, context, batch, settings, device)
                except torch.cuda.OutOfMemoryError:
                    out_of_memory.add((name, batch))
                    row["oom"] = True
                    torch.cuda.empty_cache()
                log(_row_line(row))
                rows.append(row)
    result = {"settings": asdict(settings) | {"contexts": list(contexts)}, "device": _device_name(device),
              "dtype": dtype_name(next(student.parameters()).dtype), "rows": rows,
              "ratios": ratios(rows)}
    return result


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _row_line(row: dict) -> str:
    if row.get("oom"):
        return f"{row['path']:>16} ctx {row['context']:>6} batch {row['batch']:>3}: out of memory"
    decode = "-" if row["decode_tok_s"] is None else f"{row['decode_tok_s']:.1f}"
    return (f"{row['path']:>16} ctx {row['context']:>6} batch {row['batch']:>3}: "
            f"prefill {row['prefill_tok_s']:9.0f} tok/s  decode {decode:>9} tok/s  ttft {row['ttft_s'] * 1e3:8.1f} ms")


def ratios(rows: list[dict]) -> list[dict]:
    """Per (context, batch): hybrid over teacher, each side on its best path for that number."""
    by_key: dict = {}
    for row in rows:
        if not row.get("oom"):
            by_key.setdefault((row["context"], row["batch"]), {})[row["path"]] = row
    out = []
    for (context, batch), paths in sorted(by_key.items()):
        hybrid = [paths[p] for p in PATHS[:2] if p in paths]
        teacher = [paths[p] for p in PATHS[2:] if p in paths]
        if not hybrid or not teacher:
            continue
        entry = {"context": context, "batch": batch}
        # Every "x" is a speedup (> 1: the hybrid is faster); cache and memory are fractions of the teacher's.
        for key, name, better in (("decode_tok_s", "decode_speedup", max), ("prefill_tok_s", "prefill_speedup", max),
                                  ("ttft_s", "ttft_speedup", min)):
            h = better((r[key] for r in hybrid if r[key] is not None), default=None)
            t = better((r[key] for r in teacher if r[key] is not None), default=None)
            entry[name] = (t / h if key == "ttft_s" else h / t) if h and t else None
        # Cache at equal capacity: the static paths when both ran, else the generate paths.
        pair = ("hybrid fast", "teacher static") if {"hybrid fast", "teacher static"} <= set(paths) else \
            ("hybrid generate", "teacher generate")
        if set(pair) <= set(paths):
            entry["cache_ratio"] = paths[pair[0]]["cache_bytes_per_seq"] / paths[pair[1]]["cache_bytes_per_seq"]
        peaks = [[r["peak_mem_gib"] for r in side if r["peak_mem_gib"] is not None] for side in (hybrid, teacher)]
        entry["peak_mem_ratio"] = min(peaks[0]) / min(peaks[1]) if all(peaks) else None
        out.append(entry)
    return out


def check_target_names(targets) -> None:
    """Before any measuring: every (ratio, value) target names a ratio the bench reports."""
    for name, _ in targets:
        if name not in AT_LEAST + AT_MOST:
            raise UserError(f"unknown target ratio {name!r}; one of {', '.join(AT_LEAST + AT_MOST)}")


def parse_target(text: str) -> tuple[str, float]:
    """--target's text: "decode_speedup=8" -> ("decode_speedup", 8.0); ValueError, with what is wrong, otherwise."""
    name, _, value = (part.strip() for part in text.partition("="))
    if name not in AT_LEAST + AT_MOST:
        raise ValueError(f"unknown ratio {name!r} in {text!r}; one of {', '.join(AT_LEAST + AT_MOST)}")
    try:
        return name, float(value)
    except ValueError:
        raise ValueError(f"{text!r}: expected RATIO=NUMBER, e.g. decode_speedup=8") from None


def check_targets(ratio_rows: list[dict], targets: list[tuple[str, float]]) -> list[dict]:
    """One entry per (target, measured context and batch): the measured ratio and whether it meets the target
    (speed-ups at least the target, shares of the teacher's at most it). A ratio that was not measured fails, and
    so does every target when no teacher was measured (one entry with context and batch None)."""
    out = []
    for name, target in targets:
        for entry in ratio_rows or [{"context": None, "batch": None}]:
            measured = entry.get(name)
            passed = measured is not None and (measured >= target if name in AT_LEAST else measured <= target)
            out.append({"context": entry["context"], "batch": entry["batch"], "ratio": name, "target": target,
                        "measured": measured, "pass": passed})
    return out


def bench_tables(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        if r.get("oom"):
            rows.append([r["path"], r["context"], r["batch"], "OOM", None, None, None, None])
            continue
        rows.append([r["path"], r["context"], r["batch"], r["prefill_tok_s"], r["decode_tok_s"], r["ttft_s"] * 1e3,
                     r["peak_mem_gib"], r["cache_bytes_per_seq"] / 2**20])
    speed = format_table(["path", "context", "batch", "prefill tok/s", "decode tok/s", "TTFT ms", "peak GiB",
                          "cache MiB/seq"], rows)
    text = speed
    if result["ratios"]:
        ratio_rows = [[e["context"], e["batch"], e.get("decode_speedup"), e.get("prefill_speedup"),
                       e.get("ttft_speedup"), e.get("cache_ratio"), e.get("peak_mem_ratio")] for e in result["ratios"]]
        ratio = format_table(["context", "batch", "decode x", "prefill x", "TTFT x", "cache share", "peak mem share"],
                             ratio_rows)
        text += f"\n\nhybrid / teacher (best path each)\n{ratio}"
    if result.get("targets"):
        text += "\n"
    for t in result.get("targets", []):
        sign = ">=" if t["ratio"] in AT_LEAST else "<="
        where = "no teacher measured" if t["context"] is None else f"{t['context']} ctx, batch {t['batch']}"
        measured = "not measured" if t["measured"] is None else f"{t['measured']:.3f}"
        text += f"\ntarget {t['ratio']} {sign} {t['target']:g} at {where}: {measured} {'PASS' if t['pass'] else 'FAIL'}"
    return text


def small_bench(student, teacher, tokenizer, *, settings: BenchSettings | None = None, log=print):
    """(results dict, printable tables) on CPU-sized settings, for the demo and the tests."""
    result = run_bench(student, teacher, settings or BenchSettings.small(), pad_token_id=tokenizer.pad_token_id,
                       log=log)
    return result, bench_tables(result)
