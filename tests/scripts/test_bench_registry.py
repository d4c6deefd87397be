"""scripts/bench: every case's inputs and variants at tiny shapes on the CPU, the byte and FLOP accounting, the
ratios in the table and the JSON record, and the entry point's one-line exit without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_script, requires_cuda

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench"


def load(name: str):
    return load_script(BENCH / f"{name}.py")


registry = load("registry")
report = load("report")

# One tiny shape per case: odd lengths and partial chunks where the op has them, grouped heads where it groups.
TINY = {
    "gated_delta.step": {"B": 2, "H": 3, "D": 16},
    "gated_delta.chunk": {"B": 2, "T": 37, "H": 3, "D": 16},
    "gated_delta.raw_inputs": {"B": 2, "T": 37, "HK": 1, "H": 3, "D": 16},
    "ssd.step": {"B": 2, "G": 1, "H": 2, "N": 16, "P": 8},
    "ssd.chunk": {"B": 1, "T": 37, "G": 1, "H": 2, "N": 16, "P": 8},
    "conv1d": {"B": 2, "T": 13, "D": 24, "W": 4},
    "gated_rms_norm": {"B": 2, "T": 5, "H": 3, "D": 16},
    "decode_attention": {"B": 2, "Hkv": 2, "G": 3, "D": 16, "S": 40},
    # Head dim 32: at head dim 16, torch 2.13's CPU flex attention returns wrong rows (or NaN) for lengths of 8 mod 16,
    # depending on what the allocator hands it. The model runs flex attention only on CUDA.
    "window_attention": {"B": 1, "T": 40, "H": 4, "Hkv": 2, "D": 32, "W": 8},
}
# Baselines that compute another function (a teacher layer's full attention), so their output differs from ours.
OTHER_FUNCTIONS = {"full causal SDPA"}
CPU = torch.device("cpu")


def output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def leaf_grads(inputs: dict) -> dict:
    return {name: t.grad.clone() for name, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}


def test_every_case_has_a_tiny_shape_and_a_headline_set():
    assert set(TINY) == set(registry.CASES)
    for case in registry.CASES.values():
        assert case.shapes["headline"], case.name
        assert all(set(shape) - {"model"} == set(TINY[case.name]) for shapes in case.shapes.values()
                   for shape in shapes), case.name


@pytest.mark.parametrize("name", list(TINY))
def test_each_variant_runs_on_the_cpu_and_agrees_with_ours(name):
    """Ours (the reference backends on the CPU), the CPU peers (SDPA) and baselines: outputs close to ours in fp32;
    a fwd+bwd call leaves finite gradients on every input and clears them first (a second call gives the same)."""
    case = registry.CASES[name]
    impls = {"ours": case.ours, "peer": case.peer_variants(), **case.others}
    for variant_name, variant in case.ours.items():
        if not variant.cpu:
            continue
        torch.manual_seed(0)
        inputs = case.build(TINY[name], CPU, torch.float32, variant.backward)
        state = inputs.get("state")
        state_before = None if state is None else state.clone()
        expected = output(variant.bind(inputs)())
        if variant.backward:
            grads = leaf_grads(inputs)
            assert set(grads) == {k for k in inputs if k != "do" and isinstance(inputs[k], torch.Tensor)}
            assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()), name
            variant.bind(inputs)()
            for key, grad in leaf_grads(inputs).items():
                torch.testing.assert_close(grad, grads[key], msg=f"{name} {key}: gradients accumulated")
            continue
        assert torch.isfinite(expected).all(), name
        if state is not None:
            assert not torch.equal(state, state_before), f"{name}: the decode step left its state as it was"
        for impl, variants in impls.items():
            other = variants.get(variant_name)
            if impl == "ours" or other is None or impl in OTHER_FUNCTIONS:
                continue
            if state is not None:
                inputs["state"] = state_before.clone()
            torch.testing.assert_close(output(other.bind(inputs)()).float(), expected.float(), rtol=1e-4, atol=1e-5,
                                       msg=f"{name} {variant_name}: {impl} differs from ours")


def test_only_flex_attention_backward_lacks_a_cpu_path():
    cpu_less = {(case.name, name) for case in registry.CASES.values() for name, v in case.ours.items() if not v.cpu}
    assert cpu_less == {("window_attention", "fwd+bwd")}


@pytest.mark.parametrize("name", [name for name, case in registry.CASES.items() if case.traffic is not None])
def test_traffic_counts_the_real_inputs_outputs_and_gradients(name):
    """reads: every input tensor's bytes as built in bf16; writes: the output's (and a decode step's state);
    grads: the inputs that take gradients."""
    case, shape = registry.CASES[name], TINY[name]
    traffic = case.traffic(shape, torch.bfloat16.itemsize)
    backward = any(v.backward for v in case.ours.values())
    inputs = case.build(shape, CPU, torch.bfloat16, backward)
    tensors = {k: t for k, t in inputs.items() if isinstance(t, torch.Tensor) and k != "do"}
    assert traffic.reads == sum(t.numel() * t.element_size() for t in tensors.values())
    forward = next(v for v in case.ours.values() if not v.backward)
    out = output(forward.bind(case.build(shape, CPU, torch.bfloat16, False))())
    state = inputs.get("state")
    assert traffic.writes == out.numel() * out.element_size() + (0 if state is None else state.numel() * 4)
    if backward:
        assert traffic.grads == sum(t.numel() * t.element_size() for t in tensors.values() if t.requires_grad)


def test_gated_delta_chunk_bytes_by_hand():
    shape = {"B": 2, "T": 64, "H": 3, "D": 16}
    case = registry.CASES["gated_delta.chunk"]
    # 384 (token, head) rows; q, k, v bf16: 3 * 16 * 2 = 96 B, beta bf16 2 B, g fp32 4 B -> 102 B a row read;
    # o 16 * 2 = 32 B a row written
    reads, writes = 384 * 102, 384 * 32
    assert case.bytes(shape, "fwd", 2) == reads + writes == 51_456
    # the backward reads q, k, v, g, beta again and do, and writes dq, dk, dv, dg, dbeta
    assert case.bytes(shape, "fwd+bwd", 2) == 2 * (reads + writes) + reads == 142_080


def test_decode_step_bytes_by_hand():
    case = registry.CASES["gated_delta.step"]
    # B2 H3 D16: q, k, v, o 6 * 16 * 2 = 192 B each, beta 6 * 2, g 6 * 4, state 6 * 16 * 16 * 4 = 6144 B read and
    # written
    assert case.bytes({"B": 2, "H": 3, "D": 16}, "step", 2) == 3 * 192 + 12 + 24 + 192 + 2 * 6144 == 13_092
    attention = registry.CASES["decode_attention"]
    # B2 Hkv1 G2 D4 S8: q 16 elements, keys + values 128, bf16; valid 16 bool bytes; o 16 elements
    assert attention.bytes({"B": 2, "Hkv": 1, "G": 2, "D": 4, "S": 8}, "step", 2) == 32 + 256 + 16 + 32


def test_window_flops_by_hand():
    case = registry.CASES["window_attention"]
    shape = {"B": 1, "T": 5, "H": 2, "Hkv": 1, "D": 8, "W": 3}
    # visible keys per query: 1, 2, 3, 3, 3 = 12; 2 matmuls x 2 FLOPs x 12 pairs x H2 x D8
    assert case.flop_count(shape, "fwd") == 4 * 12 * 2 * 8 == 768
    assert case.flop_count(shape, "fwd+bwd") == 768 * 7 // 2
    assert case.bytes(shape, "fwd", 2) is None  # compute-bound: no bandwidth share


def test_select_by_case_or_op():
    assert [c.name for c in registry.select(["gated_delta"])] == [
        "gated_delta.step", "gated_delta.chunk", "gated_delta.raw_inputs"]
    assert [c.name for c in registry.select(["ssd.chunk", "conv1d"])] == ["ssd.chunk", "conv1d"]
    assert len(registry.select([])) == len(registry.CASES)
    with pytest.raises(KeyError):
        registry.select(["gated_delta.nope"])


def test_table_and_record_give_the_ratios_of_given_timings():
    rows = [
        report.Row("gated_delta.chunk", "B4 T4096 H16 D128", "fwd", "fla-core chunk_gated_delta_rule",
                   ours_ms=0.5, peer_ms=1.25, bytes=1_500_000_000),
        report.Row("window_attention", "train B4 T8192", "fwd+bwd", "SDPA with the window mask", ours_ms=2.0,
                   flops=10**12, others_ms={"full causal SDPA": 9.0}),
        report.Row("conv1d", "B4", "fwd", "fla-core causal_conv1d (not available)", ours_ms=None, bytes=100,
                   errors={"ours": "OutOfMemoryError: no"}),
    ]
    copy = 4e12  # B/s
    record = json.loads(json.dumps(report.record(rows, copy, 2**31, {"gpu": "test"})))
    first, window, failed = record["rows"]
    assert first["ours_over_peer"] == pytest.approx(0.4)
    assert first["bytes_per_s"] == pytest.approx(3e12)  # 1.5 GB in 0.5 ms
    assert first["bandwidth_share"] == pytest.approx(0.75)
    assert first["floor_ms"] == pytest.approx(0.375)
    assert window["tflops"] == pytest.approx(500.0) and window["bandwidth_share"] is None
    assert window["ours_over_peer"] is None and window["others_ms"] == {"full causal SDPA": 9.0}
    assert failed["bandwidth_share"] is None and failed["errors"] == {"ours": "OutOfMemoryError: no"}
    assert record["copy_bandwidth"] == {"bytes_per_s": copy, "bytes_copied": 2**31}
    assert record["environment"] == {"gpu": "test"}

    lines = report.table(rows, copy).splitlines()
    first_line = next(line for line in lines if line.startswith("gated_delta.chunk")).split()
    assert first_line[first_line.index("fwd") + 1:first_line.index("fwd") + 6] == ["0.5", "1.25", "0.4", "3000", "75%"]
    window_line = next(line for line in lines if line.startswith("window_attention"))
    assert "500" in window_line.split() and "full causal SDPA 9.000 ms (4.50x ours)" in window_line
    failed_line = next(line for line in lines if line.startswith("conv1d")).split()
    assert failed_line[2:9] == ["fwd", "-", "-", "-", "-", "-", "-"]
    assert "peer of conv1d: fla-core causal_conv1d (not available)" in lines
    assert lines[-1].endswith("4,000 GB/s")


def run_entry_point(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "0"}  # the tests interpret Triton; a run does not
    return subprocess.run([sys.executable, str(BENCH / "run.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only exit")
def test_entry_point_without_a_gpu_exits_with_one_line():
    done = run_entry_point("--case", "gated_delta")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "run.py: error: the kernel benchmarks need a CUDA GPU, and torch sees none on this machine"]


@requires_cuda
def test_entry_point_on_the_gpu_writes_the_record(tmp_path):
    out = tmp_path / "bench.json"
    done = run_entry_point("--case", "gated_rms_norm", "--case", "decode_attention", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["environment"]["gpu"] == torch.cuda.get_device_name()
    assert {"torch", "triton", "transformers"} <= set(record["environment"]["versions"])
    assert "--case gated_rms_norm" in record["environment"]["command"]
    assert record["copy_bandwidth"]["bytes_per_s"] > 1e11
    shapes = registry.CASES["decode_attention"].shapes["headline"]
    assert len(record["rows"]) == 2 + len(shapes)  # norm fwd and fwd+bwd, one decode row per headline shape
    assert all(row["ours_ms"] > 0 and 0 < row["bandwidth_share"] < 2 for row in record["rows"])
