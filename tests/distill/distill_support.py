"""Helpers for the distillation tests: recipes over the tiny models, running the CLI, reading metrics."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# One layer of each replaced kind around a kept attention layer; a small window so sliding attention differs.
TINY_LAYER_TYPES = ["gated_deltanet", "full_attention", "mamba2", "sliding_attention"]
TINY_WINDOW = 24


def error_lines(stderr: str) -> list[str]:
    """The one-line errors a command printed (the CLI's "error:" lines)."""
    return [line for line in stderr.splitlines() if "error:" in line]


def tiny_recipe(tiny_models: Path, text_file: Path, output_dir: Path, changes: dict | None = None) -> dict:
    """A two-stage recipe over the tiny models: 4 steps each of 4 x 64 tokens; `changes` maps dotted keys to values."""
    recipe = {
        "teacher": str(tiny_models / "teacher"),
        "init": str(tiny_models / "init"),
        "output_dir": str(output_dir),
        "seed": 0,
        "data": {"source": str(text_file), "held_out_fraction": 0.1},
        "stages": [
            {"name": "attention", "kind": "attention_output", "tokens": 1024, "seq_len": 64,
             "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
            {"name": "kd", "kind": "kd", "tokens": 1024, "seq_len": 64, "global_batch_size": 4,
             "micro_batch_size": 2, "lr": 1e-3, "kl_chunk_tokens": 96},
        ],
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {"every_steps": 1, "eval_sequences": 8, "trackers": ["tensorboard"]},
    }
    for key, value in (changes or {}).items():
        node = recipe
        *path, last = key.split(".")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def distill_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hybridize.distill", *map(str, args)]


def run_distill(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(distill_command(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until `path` exists, while `process` (which makes it) still runs."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def kill_after(path: Path, *args: str) -> None:
    """Run `hybridize distill ARGS` until `path` (a checkpoint) exists, then SIGKILL it: no cleanup, no final save,
    as if the machine went away."""
    process = subprocess.Popen(distill_command(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(path, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
