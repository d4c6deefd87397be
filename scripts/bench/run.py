"""Time the kernels against their peers on a CUDA GPU: the cases of registry.py, one table, one JSON record.

    python scripts/bench/run.py --list
    python scripts/bench/run.py --case gated_delta --case ssd [--shapes headline|models|...|all] [--json OUT.json]
    python scripts/bench/run.py --case gated_delta.chunk --profile

--case takes a case name or an op (gated_delta: every gated_delta.* case); none given: every case. --shapes picks
a shape set of each case (default headline; cases without the set are left out). Each row: our median ms, the
peer's (fla-core where installed, else "-"; SDPA for the attention cases), ours / peer, our bytes/s as a share of
the device-to-device copy bandwidth measured at the start of the run, TFLOP/s where FLOPs are counted, and the
further baselines. --json is rewritten after every row, so a run stopped part way keeps what it measured.
--profile prints, instead of timings, each variant's CUDA kernels at the set's first shape.
"""

import argparse
import importlib.metadata
import shlex
import sys
from pathlib import Path

import torch
import transformers
import triton
from kernel_profile import print_kernel_table
from registry import CASES, Case, select, shape_label
from report import Row, record, table
from timing import GIB, copy_bandwidth, time_ms

import hybridize
from hybridize.atomic import write_json_atomic
from hybridize.dtypes import DTYPES, dtype_name, parse_dtype
from hybridize.errors import UserError

ALL_SETS = "all"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", default=[], metavar="NAME",
                        help="a case or an op, repeatable (default: every case)")
    parser.add_argument("--shapes", default="headline", metavar="SET", help=f"shape set, or '{ALL_SETS}'")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="activation dtype")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the record here")
    parser.add_argument("--profile", action="store_true", help="per-kernel device time instead of timings")
    parser.add_argument("--list", action="store_true", help="print the cases, their shape sets and variants")
    return parser.parse_args(argv)


def listing() -> str:
    lines = []
    for case in CASES.values():
        lines.append(f"{case.name}: {case.about}")
        lines.append(f"  variants: {', '.join(case.ours)}; peer: {case.peer}"
                     + "".join(f"; baseline: {name}" for name in case.others))
        for set_name, shapes in case.shapes.items():
            lines.append(f"  --shapes {set_name}: {', '.join(shape_label(s) for s in shapes)}")
    return "\n".join(lines)


def shapes_of(case: Case, set_name: str) -> tuple[dict, ...]:
    if set_name == ALL_SETS:
        return tuple(shape for shapes in case.shapes.values() for shape in shapes)
    return case.shapes.get(set_name, ())


def describe(err: Exception) -> str:
    """An error in one line: its type and first lines (a Triton CompilationError's first line is only where)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()][:3]
    return f"{type(err).__name__}: {' / '.join(lines)}"[:300]


def timed(variant, inputs: dict) -> tuple[float | None, str | None]:
    """(median ms, None), or (None, why) when the call fails: a peer may refuse this Triton, a shape may not fit."""
    try:
        return time_ms(variant.bind(inputs)), None
    except Exception as err:  # noqa: BLE001 - reported in the row, the run goes on
        return None, describe(err)


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    try:
        fla = importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        fla = None
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "gpu_memory_bytes": props.total_memory, "dtype": dtype_name(dtype),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                         "transformers": transformers.__version__, "hybridize": hybridize.__version__,
                         "fla-core": fla},
            "command": shlex.join([Path(sys.executable).name, *sys.argv])}


def bench_case(case: Case, shapes: tuple[dict, ...], device, dtype, rows: list[Row], save) -> None:
    """Time every variant of `case` at each shape, appending to `rows` and calling save() as they fill: ours first,
    then the peer and the baselines on the same inputs."""
    peer_variants = case.peer_variants()
    peer = case.peer if peer_variants else f"{case.peer} (not available)"
    for shape in shapes:
        for name, variant in case.ours.items():
            torch.manual_seed(0)
            inputs = case.build(shape, device, dtype, variant.backward)
            row = Row(case.name, shape_label(shape), name, peer,
                      bytes=case.bytes(shape, name, dtype.itemsize), flops=case.flop_count(shape, name))
            rows.append(row)
            row.ours_ms, error = timed(variant, inputs)
            if error:
                row.errors["ours"] = error
            save()  # ours is kept even if the peer's autotuning outlasts the run's time limit
            others = {"peer": peer_variants.get(name)} | {label: v.get(name) for label, v in case.others.items()}
            for label, other in others.items():
                if other is None:
                    continue
                ms, error = timed(other, inputs)
                if label == "peer":
                    row.peer_ms = ms
                else:
                    row.others_ms[label] = ms
                if error:
                    row.errors[label] = error
            save()
            progress(row)
            del inputs
            torch.cuda.empty_cache()


def progress(row: Row) -> None:
    cells = [f"{impl} {ms:.3f} ms" for impl, ms in (("ours", row.ours_ms), ("peer", row.peer_ms),
                                                     *row.others_ms.items()) if ms is not None]
    print(f"{row.case} {row.shape} {row.variant}: {', '.join(cells) or 'no time'}", flush=True)
    for impl, error in row.errors.items():
        print(f"  {impl} failed: {error}", flush=True)


def profile(cases: list[Case], set_name: str, device, dtype) -> None:
    for case in cases:
        shapes = shapes_of(case, set_name)
        if not shapes:
            continue
        peer_variants = case.peer_variants()
        for name, variant in case.ours.items():
            for impl, chosen in (("ours", variant), (case.peer, peer_variants.get(name))):
                if chosen is not None:
                    torch.manual_seed(0)
                    inputs = case.build(shapes[0], device, dtype, chosen.backward)
                    print_kernel_table(f"{impl}: {case.name} {shape_label(shapes[0])} {name}", chosen.bind(inputs),
                                       repeats=10)
                    del inputs
                    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(listing())
        return 0
    try:
        cases = select(args.case)
    except KeyError as err:
        ops = sorted({case.op for case in CASES.values()} - set(CASES))
        raise UserError(f"no case {err.args[0]!r}; cases: {', '.join(CASES)}; ops: {', '.join(ops)}") from None
    cases = [case for case in cases if shapes_of(case, args.shapes)]
    if not cases:
        sets = sorted({name for case in CASES.values() for name in case.shapes})
        raise UserError(f"no chosen case has the shape set {args.shapes!r}; sets: {', '.join(sets)}, {ALL_SETS}")
    if not torch.cuda.is_available():
        raise UserError("the kernel benchmarks need a CUDA GPU, and torch sees none on this machine")
    device, dtype = torch.device("cuda"), parse_dtype(args.dtype)
    env = environment(device, dtype)
    print(f"{env['gpu']}, " + ", ".join(f"{k} {v or 'not installed'}" for k, v in env["versions"].items()))
    if args.profile:
        profile(cases, args.shapes, device, dtype)
        return 0
    copy_bytes_per_s, copied = copy_bandwidth(device)
    print(f"device-to-device copy of {copied / GIB:.2f} GiB: {copy_bytes_per_s / 1e9:,.0f} GB/s (read + written)")
    rows: list[Row] = []

    def save() -> None:
        if args.json:
            write_json_atomic(args.json, record(rows, copy_bytes_per_s, copied, env))

    for case in cases:
        bench_case(case, shapes_of(case, args.shapes), device, dtype, rows, save)
    print(table(rows, copy_bytes_per_s))
    failed = [row for row in rows if "ours" in row.errors]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        sys.exit(2)
