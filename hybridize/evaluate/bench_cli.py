"""`hybridize bench HYBRID [--teacher MODEL]`: prefill and decode speed, time to first token, memory, cache size.

Prints a table per path and the hybrid/teacher ratios, and writes OUT/bench.json and OUT/bench.png;
OUT defaults to HYBRID/bench, which `hybridize push` puts on the model card. Each `--target RATIO=VALUE` is
checked at every measured (context, batch): PASS/FAIL lines, a "targets" entry in bench.json, exit code 1 on a miss.
"""

import dataclasses

from ..errors import UserError
from .bench import AT_LEAST, AT_MOST, PATHS, BenchSettings, parse_target, path_flag, path_names
from .common import add_common_arguments, comma_joined, int_list
from .pipeline import bench_to_folder


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
    try:
        targets = [parse_target(text) for text in args.target]
    except ValueError as err:
        raise UserError(f"--target {err}") from None
    result = bench_to_folder(args.hybrid, args.out, settings, teacher=args.teacher, targets=targets,
                             device=args.device, dtype=args.dtype, overwrite=args.overwrite)
    return 0 if all(t["pass"] for t in result.get("targets", [])) else 1
