"""scripts/bench/kernel_profile.print_host_rows: the host's operators per call, most self time first."""

from pathlib import Path

import torch
from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "kernel_profile.py"


def test_host_rows_count_each_operator_per_call(capsys):
    x = torch.randn(64, 64)

    def fn():  # two matmuls and one add a call
        return (x @ x) @ x + x

    load_script(SCRIPT).print_host_rows(fn, repeats=3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("   host, profiled:") and "ms per call" in lines[0]
    rows = {line.split()[-1]: line.split()[3] for line in lines[1:]}
    assert rows["aten::mm"] == "x2"
    assert rows["aten::add"] == "x1"
