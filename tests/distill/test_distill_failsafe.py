"""Distillation fails safe: divergence never exports a model and names a good checkpoint; a second run into a busy
folder, a full disk, torn metrics and killed writers are handled; bad input leaves nothing behind."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from distill_support import (REPO, distill_command, error_lines, kill_after, metrics, run_distill, tiny_recipe,
                             wait_for, write_recipe)
from safetensors.torch import load_file, save_file

from hybridize.distill import checkpoints
from hybridize.distill.__main__ import main as distill_main
from hybridize.distill.disk_space import StageWrites, folder_bytes
from hybridize.distill.recipe import parse_recipe, recipe_to_dict
from hybridize.distill.run_lock import RunLock
from hybridize.distill.trainer import Trainer
from hybridize.errors import UserError


def one_stage(tiny_models, text_file, out, steps: int, stage: int = 1) -> dict:
    """Stage `stage` of the tiny recipe alone (0: attention output, 1: KD), `steps` steps of 4 x 64 tokens, a
    checkpoint every step."""
    raw = tiny_recipe(tiny_models, text_file, out, {"checkpoint.every_steps": 1})
    raw["stages"] = [raw["stages"][stage] | {"tokens": steps * 256}]
    return raw


def kill(process) -> None:
    process.send_signal(signal.SIGKILL)  # no cleanup: as if the machine went away
    process.wait()


def test_a_divergence_on_the_last_step_is_not_exported(tmp_path, tiny_models, text_file, capsys):
    out = tmp_path / "run"
    raw = one_stage(tiny_models, text_file, out, steps=4, stage=0)
    raw["stages"][0]["lr"] = 1e30
    assert distill_main([str(write_recipe(tmp_path / "r.yaml", raw)), "--max-steps", "1"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith("hybridize distill: error: stage 'attention' after step 1: the held-out loss is ")
    assert f"--resume starts the stage again from {tiny_models / 'init'}" in line
    assert not (out / "final").exists() and not list(out.rglob("*.safetensors"))


def test_the_checkpoint_named_after_a_divergence_is_good(tmp_path, tiny_models, text_file):
    """lr 1e30 without clipping from step 3 on: the checkpoint holding the diverged weights is not the one named."""
    out, recipe = tmp_path / "run", tmp_path / "r.yaml"
    write_recipe(recipe, one_stage(tiny_models, text_file, out, steps=8, stage=0))
    kill_after(out / "checkpoints" / "0-attention" / "step-00000002", recipe, "--out", out)
    diverging = ["--resume", "--set", "stages.0.lr=1e30", "--set", "stages.0.max_grad_norm=null"]
    result = run_distill(recipe, "--out", out, *diverging)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    named = line.split("the last good checkpoint is ")[1].split(" ")[0]
    weights = load_file(f"{named}/model.safetensors")
    assert all(torch.isfinite(w).all() and w.abs().max() < 1e3 for w in weights.values())
    assert sorted(p.name for p in (out / "checkpoints" / "0-attention").iterdir())[-1] == named.rsplit("/", 1)[1]
    # Resumed from it with the recipe's lr, its weights give a finite loss and the stage finishes.
    assert distill_main([str(recipe), "--out", str(out), "--resume"]) == 0
    step = int(named[-8:])
    [first] = [r for r in metrics(out) if r["split"] == "train" and r["step"] == step + 1]
    assert torch.isfinite(torch.tensor(first["loss"]))


def test_an_overflowing_optimizer_step_is_a_clean_stop(tmp_path, tiny_models, text_file):
    """An lr past what validation allows (as if set in code): AdamW's fp32 step overflows; one line, no traceback."""
    recipe = parse_recipe(one_stage(tiny_models, text_file, tmp_path / "run", steps=4))
    recipe.stages[0].lr = 1e39
    with pytest.raises(UserError, match=r"stage 'kd' step 1: the optimizer step overflows .*"
                                        r"no checkpoint of this stage was kept"):
        Trainer(recipe).run()
    assert not (tmp_path / "run" / "final").exists()


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path, tiny_models, text_file):
    out, recipe = tmp_path / "run", tmp_path / "r.yaml"
    write_recipe(recipe, one_stage(tiny_models, text_file, out, steps=40))
    holder = subprocess.Popen(distill_command(recipe, "--out", out), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(out / "checkpoints" / "0-kd" / "step-00000001", holder)
        second = run_distill(recipe, "--out", out, "--resume", timeout=120)
        assert holder.poll() is None  # still training while the second run was turned away
    finally:
        kill(holder)
    assert second.returncode == 2
    [line] = error_lines(second.stderr)
    assert line == (f"hybridize distill: error: output directory {out} is in use by another run (PID {holder.pid}); "
                    "wait for it to end or choose another --out")
    # The checkpoints hold no pickles that need arbitrary classes: safetensors, JSON, and weights-only files.
    checkpoint = next((out / "checkpoints" / "0-kd").glob("step-*"))
    assert {"model.safetensors", "progress.json"} <= {p.name for p in checkpoint.iterdir()}
    assert not list(checkpoint.glob("custom_checkpoint_*")) and not list(checkpoint.glob("pytorch_model*"))
    for pickled in checkpoint.glob("*.bin"):
        torch.load(pickled, weights_only=True)
    lock = RunLock(out)
    lock.acquire()  # kill -9 released it
    lock.release()


def test_partials_left_by_killed_writers_are_removed_on_resume(tmp_path, tiny_models, text_file):
    out = tmp_path / "run"
    raw = one_stage(tiny_models, text_file, out, steps=2)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"recipe": recipe_to_dict(parse_recipe(raw))}))
    # A real writer killed inside its staging folder, as a conversion or export killed mid-write leaves it.
    writer = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from hybridize.atomic import staged_folder\n"
        f"with staged_folder(Path({str(out / 'init')!r})) as folder:\n"
        "    (folder / 'model.safetensors').write_bytes(bytes(1000)); print('in', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "in\n"
    kill(writer)
    (out / "checkpoints" / "0-kd" / ".partial-step-00000001").mkdir(parents=True)
    assert len(list(out.rglob("*.partial-*"))) == 2
    assert distill_main([str(recipe), "--resume"]) == 0
    assert not list(out.rglob("*.partial-*")) and (out / "final" / "config.json").exists()


def mount_small_disk(folder, size: str):
    """A real file system of `size` (tmpfs). Mounting needs root; elsewhere the test is skipped, and
    test_a_simulated_full_disk_is_one_line covers the full-disk path with an injected ENOSPC."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    return folder


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB file system: the tiny KD stage's two checkpoints (about 2 MB each: its trained weights with AdamW's
    moments) and its 17 MB model fit."""
    yield mount_small_disk(tmp_path / "disk", "24m")
    subprocess.run(["umount", "--lazy", str(tmp_path / "disk")], check=True)  # the in-process run may hold a file


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays_resumable(tmp_path, tiny_models, text_file,
                                                                        small_disk, monkeypatch, capsys):
    """Another writer fills the disk after the first checkpoint: the second one's save fails on the real file system."""
    out = small_disk / "run"
    recipe = write_recipe(tmp_path / "r.yaml", one_stage(tiny_models, text_file, out, steps=4))
    save_checkpoint = checkpoints.save_checkpoint

    def save_on_a_filling_disk(accelerator, folder, step, *args):
        if step == 2:
            with open(small_disk / "ballast", "wb") as ballast:
                os.posix_fallocate(ballast.fileno(), 0, shutil.disk_usage(small_disk).free)
        return save_checkpoint(accelerator, folder, step, *args)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_on_a_filling_disk)
    assert distill_main([str(recipe)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    first = out / "checkpoints" / "0-kd" / "step-00000001"
    assert line.startswith("hybridize distill: error: the disk is full (")
    assert line.endswith(f"training stopped, the last good checkpoint is {first} (--resume continues from it)")
    assert sorted(p.name for p in first.parent.iterdir()) == ["step-00000001"]  # the failed save left nothing
    # torch.save's own message on a full disk (no errno in it) is recognized too.
    from hybridize.distill.disk_space import is_disk_full

    with pytest.raises(RuntimeError) as caught:
        torch.save(torch.zeros(4_000_000), small_disk / "big.pt")
    assert is_disk_full(caught.value), caught.value
    (small_disk / "big.pt").unlink(missing_ok=True)
    (small_disk / "ballast").unlink()
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_checkpoint)
    assert distill_main([str(recipe), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out and (out / "final" / "config.json").exists()


def test_a_stage_whose_writes_cannot_fit_is_refused_before_it_trains(tmp_path, tiny_models, text_file, capsys):
    """8 MB free cannot take the stage's 17 MB model: one line with the sizes, before the first step."""
    disk = mount_small_disk(tmp_path / "disk", "8m")
    try:
        out = disk / "run"
        recipe = write_recipe(tmp_path / "r.yaml", one_stage(tiny_models, text_file, out, steps=4))
        assert distill_main([str(recipe)]) == 2
        [line] = error_lines(capsys.readouterr().err)
        sizes = re.fullmatch(r"hybridize distill: error: stage 'kd' needs about ([\d.]+) MB of disk under (\S+) "
                             r"\(2 checkpoint\(s\) of ([\d.]+) MB while it trains, then its ([\d.]+) MB model\) and "
                             r"([\d.]+) MB are free; free some space or choose another --out", line)
        assert sizes and sizes[2] == str(out), line
        needed, checkpoint, model, free = (float(sizes[i]) for i in (1, 3, 4, 5))
        assert abs(model - folder_bytes(tiny_models / "init") / 1e6) < 0.3  # the starting folder, plus small files
        assert 2.0 < checkpoint < 2.4  # 0.17M trained fp32 weights and two AdamW moments, plus small files
        assert abs(needed - (2 * checkpoint + model)) < 0.2 and free <= round(8 * 2**20 / 1e6, 1)  # 8 MiB
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
        # With room (another --out), the same recipe trains.
        assert distill_main([str(recipe), "--out", str(tmp_path / "roomy")]) == 0
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


@pytest.mark.parametrize("saves, existing, expected", [
    (0, 0, 10),  # no checkpoint: only the model
    (1, 0, 1 + 10),  # one checkpoint, kept while the model is written
    (5, 0, 2 * 1 + 10),  # two held, the model larger than the one written before the oldest goes
    (5, 2, 2 * 1 + 10 - 2),  # resumed: the two held are on disk already
])
def test_a_stages_disk_peak_counts_held_checkpoints_and_the_model(saves, existing, expected):
    writes = StageWrites(checkpoint=1, saves=saves, held=2, model=10, existing=existing)
    assert writes.peak() == expected
    # A checkpoint larger than the model: the next one is written before the oldest is removed.
    assert StageWrites(checkpoint=10, saves=3, held=2, model=1, existing=0).peak() == 30


def test_a_checkpoint_without_a_trained_weight_is_refused(tmp_path, tiny_models, text_file):
    out, recipe = tmp_path / "run", tmp_path / "r.yaml"
    write_recipe(recipe, one_stage(tiny_models, text_file, out, steps=8))
    kill_after(out / "checkpoints" / "0-kd" / "step-00000002", recipe, "--out", out)
    latest = sorted((out / "checkpoints" / "0-kd").glob("step-*"))[-1]
    weights = load_file(latest / "model.safetensors")
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, latest / "model.safetensors")
    result = run_distill(recipe, "--out", out, "--resume")
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result.stderr) == [f"hybridize distill: error: checkpoint {latest} lacks 1 trained weight(s) of "
                                          f"this stage, e.g. {dropped!r}; it was not written by this run"]


def test_a_simulated_full_disk_is_one_line(tmp_path, tiny_models, text_file, monkeypatch, capsys):
    """The second checkpoint's write fails with ENOSPC: one line naming the first, which a resume continues from."""
    from accelerate import Accelerator

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", one_stage(tiny_models, text_file, out, steps=4))
    save_state, calls = Accelerator.save_state, []

    def failing_save_state(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", failing_save_state)
    assert distill_main([str(recipe)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    first = out / "checkpoints" / "0-kd" / "step-00000001"
    assert line.startswith("hybridize distill: error: the disk is full (")
    assert line.endswith(f"training stopped, the last good checkpoint is {first} (--resume continues from it)")
    assert sorted(p.name for p in first.parent.iterdir()) == ["step-00000001"]
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    assert distill_main([str(recipe), "--resume"]) == 0
    assert (out / "final" / "config.json").exists()


def test_out_of_gpu_memory_is_one_line_and_resumes_at_a_smaller_micro_batch(tmp_path, tiny_models, text_file,
                                                                          monkeypatch, capsys):
    """Step 3's first backward raises torch.OutOfMemoryError, as CUDA does (a CPU run cannot run out of memory that
    way): one line with both fixes, naming step 2's checkpoint. The resume at micro batch 1 with checkpointing
    trains the same global batches, so its steps' losses are an uninterrupted run's."""
    from accelerate import Accelerator

    out, whole = tmp_path / "run", tmp_path / "whole"
    raw = one_stage(tiny_models, text_file, out, steps=4)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert distill_main([str(recipe), "--out", str(whole)]) == 0
    backward, calls = Accelerator.backward, []

    def backward_out_of_memory(self, loss, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # 2 micro batches per step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nMore lines follow.")
        return backward(self, loss, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", backward_out_of_memory)
    capsys.readouterr()
    assert distill_main([str(recipe)]) == 2
    checkpoint = out / "checkpoints" / "0-kd" / "step-00000002"
    assert error_lines(capsys.readouterr().err) == [
        "hybridize distill: error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB.) in stage 'kd' "
        "at micro batch 2 x 64 tokens; --set stages.0.micro_batch_size=N below 2 (the global batch of 4 stays: more "
        "micro batches accumulate) or --set stages.0.gradient_checkpointing=true; training stopped, the last good "
        f"checkpoint is {checkpoint} (--resume continues from it)"]
    assert not (out / "final").exists()
    monkeypatch.setattr(Accelerator, "backward", backward)
    assert distill_main([str(recipe), "--resume", "--set", "stages.0.micro_batch_size=1",
                         "--set", "stages.0.gradient_checkpointing=true"]) == 0
    train = {run: [r["loss"] for r in metrics(run) if r["split"] == "train"] for run in (out, whole)}
    # Micro batches of 1 sum the same per-sequence losses as micro batches of 2 (every sequence has 64 tokens), so
    # the steps differ by the order of fp32 sums only (eps 6e-8 per rounding, ~1e-7 seen at step 4); 1e-5 leaves
    # room for AdamW's normalized step to grow that over two steps, and fails on any other batch.
    assert len(train[out]) == len(train[whole]) == 4
    assert train[out] == pytest.approx(train[whole], rel=1e-5)


def test_out_of_gpu_memory_in_stage_1_suggests_only_a_smaller_micro_batch(tmp_path, tiny_models, text_file,
                                                                         monkeypatch, capsys):
    """Stage 1 calls the mixers outside their decoder layers, so gradient checkpointing would not change its memory."""
    from accelerate import Accelerator

    def backward_out_of_memory(self, loss, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(Accelerator, "backward", backward_out_of_memory)
    recipe = write_recipe(tmp_path / "r.yaml", one_stage(tiny_models, text_file, tmp_path / "run", steps=2, stage=0))
    assert distill_main([str(recipe)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "in stage 'attention' at micro batch 2 x 64 tokens; --set stages.0.micro_batch_size=N below 2 (the " \
           "global batch of 4 stays: more micro batches accumulate); training stopped, no checkpoint" in line


@pytest.mark.parametrize("change, message", [
    ({"teacher": "/nonexistent/teacher"}, "/nonexistent/teacher"),
    ({"plan": "uniform:2:gated_deltanett"}, "unknown layer type 'gated_deltanett'"),
    ({"memory_outside_window": True}, "memory_outside_window (convert --memory-outside-window) applies to "
                                      "window_gated_deltanet and window_mamba2 layers, and the plan has none"),
    ({"stages.1.memory_lr": 1e-3}, "stages[1].memory_lr applies to the recurrent branch of window_gated_deltanet, "
                                   "window_mamba2, headwise_gated_deltanet, headwise_mamba2 layers, and the plan has "
                                   "none"),
    ({"teacher": "QWEN"}, "Llama"),
])
def test_a_run_that_fails_at_its_start_leaves_nothing(tmp_path, tiny_models, text_file, capsys, change, message):
    if change.get("teacher") == "QWEN":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1)
        Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tiny_models / "teacher" / name).exists():
                (tmp_path / "qwen" / name).write_bytes((tiny_models / "teacher" / name).read_bytes())
        change = {"teacher": str(tmp_path / "qwen")}
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_models, text_file, out, {"plan": "uniform:2:gated_deltanet", "init": None, **change})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert distill_main([str(recipe)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert message in line, line
    assert not out.exists()


def test_a_torn_last_metrics_line_is_dropped_and_complete_ones_kept(tmp_path):
    from hybridize.distill.tracking import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    rows = [{"stage_index": 0, "step": step, "split": "train", "loss": 1.0 / (step + 1)} for step in range(3)]
    for row in rows:
        log.append(row)
    with open(log.path, "a") as f:
        f.write('{"stage_index": 0, "step": 3, "spl')  # killed mid-append
    assert log.rows() == rows
    log.truncate_after(0, 2)
    log.append(rows[0] | {"step": 3})
    assert log.rows() == rows + [rows[0] | {"step": 3}]
