"""The kernel benchmarks' results: one row per (case, shape, variant), the ratios derived from its timings, the
printed table and the JSON record."""

from dataclasses import asdict, dataclass, field

from hybridize.evaluate.common import format_table


@dataclass
class Row:
    case: str
    shape: str
    variant: str
    peer: str  # what the peer column holds for this case
    ours_ms: float | None = None
    peer_ms: float | None = None
    bytes: int | None = None  # ideal bytes moved by one call (registry.Traffic), None for a compute-bound case
    flops: int | None = None
    others_ms: dict[str, float | None] = field(default_factory=dict)  # further baselines by name
    errors: dict[str, str] = field(default_factory=dict)  # "ours", "peer" or a baseline -> why it has no time


def derived(row: Row, copy_bytes_per_s: float) -> dict:
    """Ratios from a row's timings: ours ÷ peer, our bytes/s and its share of the measured copy bandwidth, the
    time the bytes take at that bandwidth (the floor), and our TFLOP/s. None where an input is missing."""
    ours_s = None if row.ours_ms is None else row.ours_ms * 1e-3
    out = {"ours_over_peer": None, "bytes_per_s": None, "bandwidth_share": None, "floor_ms": None, "tflops": None}
    if row.ours_ms is not None and row.peer_ms:
        out["ours_over_peer"] = row.ours_ms / row.peer_ms
    if row.bytes is not None:
        out["floor_ms"] = row.bytes / copy_bytes_per_s * 1e3
        if ours_s:
            out["bytes_per_s"] = row.bytes / ours_s
            out["bandwidth_share"] = out["bytes_per_s"] / copy_bytes_per_s
    if row.flops is not None and ours_s:
        out["tflops"] = row.flops / ours_s / 1e12
    return out


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _others_cell(row: Row) -> str:
    cells = []
    for name, ms in row.others_ms.items():
        if ms is None:
            cells.append(f"{name} -")
        else:
            relative = f" ({ms / row.ours_ms:.2f}x ours)" if row.ours_ms else ""
            cells.append(f"{name} {ms:.3f} ms{relative}")
    return "; ".join(cells)


def table(rows: list[Row], copy_bytes_per_s: float) -> str:
    """The printed table: ms to 3 decimals, '-' where there is no figure, the peers and the copy bandwidth below."""
    header = ["case", "shape", "variant", "ours ms", "peer ms", "ours/peer", "GB/s", "copy bw", "TFLOP/s", "others"]
    body = []
    for row in rows:
        d = derived(row, copy_bytes_per_s)
        share = None if d["bandwidth_share"] is None else f"{d['bandwidth_share']:.0%}"
        gb_s = None if d["bytes_per_s"] is None else round(d["bytes_per_s"] / 1e9)
        body.append([row.case, row.shape, row.variant, _rounded(row.ours_ms, 3), _rounded(row.peer_ms, 3),
                     _rounded(d["ours_over_peer"], 2), gb_s, share, _rounded(d["tflops"], 1), _others_cell(row)])
    peers = {row.case: row.peer for row in rows}
    legend = [f"peer of {case}: {peer}" for case, peer in peers.items()]
    legend.append(f"copy bw: share of the measured device-to-device copy bandwidth, {copy_bytes_per_s / 1e9:,.0f} GB/s")
    return "\n".join([format_table(header, body), *legend])


def record(rows: list[Row], copy_bytes_per_s: float, copied_bytes: int, environment: dict) -> dict:
    """The JSON record: where and how it ran, the measured copy bandwidth, and every row with its ratios."""
    return {"environment": environment,
            "copy_bandwidth": {"bytes_per_s": copy_bytes_per_s, "bytes_copied": copied_bytes},
            "rows": [{**asdict(row), **derived(row, copy_bytes_per_s)} for row in rows]}
