"""`hybridize bench HYBRID [--teacher MODEL]`: prefill and decode speed, time to first token, memory, cache size.

Prints a table per path and the hybrid/teacher ratios, and writes OUT/bench.json and OUT/bench.png;
OUT defaults to HYBRID/bench, which `hybridize push` puts on the model card. Each `--target RATIO=VALUE` is
checked at every measured (context, batch): PASS/FAIL lines, a "targets" entry in bench.json, exit code 1 on a miss.
"""

import dataclasses

from .. import __version__
from ..errors import UserError
from .bench import AT_LEAST, AT_MOST, PATHS, BenchSettings, bench_tables, check_targets, parse_target, path_flag, \
    path_names, run_bench
from ..atomic import staged_folder, write_json_atomic
from ..device import pick_device
from .common import add_common_arguments, comma_joined, int_list, load_pair, output_folder, pick_dtype
from .plots import plot_bench


def add_arguments(parser) -> None:
    add_common_arguments(parser, "bench")
    full, small = BenchSettings(), BenchSettings.small()
    parser.add_argument("--contexts", type=int_list, default=None,
                        help="total tokens (prompt + new), e.g. 1024,8192 (default: 1K, 2K, ... up to the teacher's "
                             f"limit; --small: {comma_joined(small.contexts)}; a size that runs out of memory ends "
                             "its row)")
    parser.add_argument("--batch-sizes", type=int_list, default=None,
                        help=f"sequences per run (default: {comma_joined(full.batch_sizes)}; --small: "
                             f"{comma_joined(small.batch_sizes)})")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help=f"tokens decoded per run (default: {full.new_tokens}; --small: {small.new_tokens})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per measurement, after one warm-up; the median is reported (default: "
                             f"{full.repeats}; --small: {small.repeats})")
    parser.add_argument("--paths", type=path_names, default=None,
                        help=f"comma-separated, any of: {','.join(map(path_flag, PATHS))} (default: all)")
    parser.add_argument("--no-compile", action="store_true",
                        help="capture the hybrid's decode step as a CUDA graph without torch.compile first")
    parser.add_argument("--target", action="append", default=[], metavar="RATIO=VALUE",
                        help=f"a hybrid/teacher ratio to check at every measured context and batch, repeatable, e.g. "
                             f"decode_speedup=8 or cache_ratio=0.3; at least VALUE: {', '.join(AT_LEAST)}; at most "
                             f"VALUE: {', '.join(AT_MOST)}. A miss prints FAIL and exits with code 1")


def run(args) -> int:
    settings = BenchSettings.small() if args.small else BenchSettings()
    given = {"contexts": args.contexts, "batch_sizes": args.batch_sizes, "new_tokens": args.new_tokens,
             "repeats": args.repeats, "paths": args.paths, "compile_fast": False if args.no_compile else None}
    settings = dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})
    unknown = set(settings.paths) - set(PATHS)
    if unknown:
        raise UserError(f"unknown bench path {path_flag(sorted(unknown)[0])!r}; allowed: "
                        f"{','.join(map(path_flag, PATHS))}")
    if settings.new_tokens < 2:
        raise UserError("--new-tokens must be at least 2 (decode speed is measured after the first token)")
    if settings.contexts and min(settings.contexts) <= settings.new_tokens:
        raise UserError(f"every context must exceed --new-tokens ({settings.new_tokens}): "
                        "a context counts prompt + new tokens")
    try:
        targets = [parse_target(text) for text in args.target]
    except ValueError as err:
        raise UserError(f"--target {err}") from None
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    out_dir, replace = output_folder(args)

    student, teacher, tokenizer, teacher_name = load_pair(args.hybrid, args.teacher, dtype=dtype, device=device)
    print(f"hybrid {args.hybrid} vs teacher {teacher_name or '(none)'} on {device}, {dtype}")
    result = run_bench(student, teacher, settings, pad_token_id=tokenizer.pad_token_id)
    result |= {"hybridize_version": __version__, "hybrid": str(args.hybrid), "teacher": teacher_name}
    if targets:
        result["targets"] = check_targets(result["ratios"], targets)
    print("\n" + bench_tables(result))
    with staged_folder(out_dir, replace=replace) as staging:
        write_json_atomic(staging / "bench.json", result)
        plot_bench(result, staging / "bench.png")
    print(f"\nwrote {out_dir}/bench.json, bench.png")
    return 0 if all(t["pass"] for t in result.get("targets", [])) else 1
