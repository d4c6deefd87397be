"""The trainer end to end on CPU: losses go down, kill-and-resume continues exactly, NaN stops cleanly, user errors
are one line; FSDP2's bf16 policy reduces gradients in fp32."""

import json
import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from helpers import requires_cuda
from safetensors.torch import load_file
from distill_support import REPO, error_lines, kill_after, metrics, run_distill, tiny_recipe, write_recipe

from hybridize.cli import COMMANDS
from hybridize.cli import main as hybridize_main
from hybridize.convert.pipeline import CONVERT_DEFAULTS
from hybridize.distill.__main__ import main as distill_main
from hybridize.distill.recipe import parse_recipe, recipe_to_dict
from hybridize.distill.trainer import Trainer, reduce_gradients_in_fp32, tf32_matmuls
from hybridize.evaluate.common import recorded_teacher


def test_stage2_lowers_the_kl(tmp_path, tiny_models, text_file):
    raw = tiny_recipe(tiny_models, text_file, tmp_path / "run")
    raw["stages"] = [raw["stages"][1] | {"tokens": 12 * 256, "lr": 3e-3}]  # 12 steps of 4 x 64 tokens
    final = Trainer(parse_recipe(raw)).run()
    evals = [r for r in metrics(tmp_path / "run") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 12]
    # The same 8 held-out sequences before and after: the drop is the training's, not sampling noise.
    assert evals[1]["kl"] < 0.95 * evals[0]["kl"], evals
    record = json.loads((final / "distill.json").read_text())
    # Published with the model: no local paths, only names and paths inside the run folder.
    assert str(tmp_path) not in (final / "distill.json").read_text() and "/tmp" not in json.dumps(record)
    # ... yet `hybridize eval final/` finds the local teacher again, from any working directory.
    assert recorded_teacher(final)[0] == str(tiny_models / "teacher")
    assert record["model_folder"] == "final" and record["init"] == "init" and record["recipe"]["output_dir"] == "run"
    assert record["stages"][0]["steps_done"] == 12 and record["stages"][0]["tokens"] == 12 * 256
    assert record["data"]["documents"] == {"train": 36, "held_out": 4}
    assert (final / "loss_curve.png").stat().st_size > 1000 and (tmp_path / "run" / "loss_curve.png").exists()


@requires_cuda
def test_compiled_layers_train_like_eager_ones_on_cuda(tmp_path, tiny_models, text_file):
    """Both stages on the GPU, compiled (the default) and eager: the same losses, step by step, within bf16 noise."""
    losses = {}
    for compiled in (True, False):
        out = tmp_path / f"compile-{compiled}"
        trainer = Trainer(parse_recipe(tiny_recipe(tiny_models, text_file, out, {"compile": compiled})))
        trainer.run()
        assert trainer.compiles == compiled
        losses[compiled] = [r["loss"] for r in metrics(out) if r["split"] == "train"]
    assert len(losses[True]) == 8
    for step, (a, b) in enumerate(zip(losses[True], losses[False])):
        assert abs(a - b) <= 0.02 * abs(b), f"step {step}: compiled {a} vs eager {b}"


def test_the_eval_mean_does_not_depend_on_how_the_sequences_are_batched(tmp_path, tiny_models, text_file):
    """6 held-out sequences in micro batches of 4 + 2 or 2 + 2 + 2: the same mean, each sequence counted once."""
    step0 = []
    for micro in (4, 2):
        raw = tiny_recipe(tiny_models, text_file, tmp_path / f"micro-{micro}",
                          {"logging.eval_sequences": 6, "stages.1.micro_batch_size": micro})
        raw["stages"] = [raw["stages"][1] | {"tokens": 256}]  # one step of 4 x 64 tokens
        Trainer(parse_recipe(raw)).run()
        step0.append(next(r for r in metrics(tmp_path / f"micro-{micro}") if r["split"] == "eval"))
    assert step0[0]["kl"] == pytest.approx(step0[1]["kl"], rel=1e-5), step0


def fsdp2_bf16_accelerator() -> SimpleNamespace:
    """What accelerate's FSDP2 path reads from an Accelerator under bf16 on one process.

    A real one cannot be built on CPU (accelerate selects FSDP only for GPU-like devices); the plugin gets its bf16
    policy from the same call that AcceleratorState makes.
    """
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    return SimpleNamespace(is_fsdp2=True, mixed_precision="bf16", state=SimpleNamespace(fsdp_plugin=plugin),
                           torch_device_mesh=None, parallelism_config=None, device=torch.device("cpu"),
                           is_main_process=True)


def test_fsdp2_bf16_accumulates_and_reduces_gradients_in_fp32(tmp_path):
    accelerator = fsdp2_bf16_accelerator()
    assert accelerator.state.fsdp_plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16  # accelerate's default
    reduce_gradients_in_fp32(accelerator)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = fsdp2_prepare_model(accelerator, torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)))
        policy = model._get_fsdp_state()._fsdp_param_group.mp_policy
        assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (
            torch.bfloat16, torch.float32, torch.bfloat16)
        model.set_requires_gradient_sync(False)  # what accelerator.no_sync does to an FSDP2 model
        model(torch.randn(3, 8)).float().sum().backward()
        held = [param.unsharded_accumulated_grad for param in model._get_fsdp_state()._fsdp_param_group.fsdp_params]
        assert all(grad is not None and grad.dtype == torch.float32 for grad in held)
    finally:
        dist.destroy_process_group()


def test_tf32_is_on_only_while_a_gpu_run_trains():
    """The flag is process-wide: after a run (or a failed one) later fp32 code gets fp32 matmuls again. Left on, it
    failed the fp32 flex-vs-SDPA tests that ran after the trainer tests in one pytest process on the H100."""
    assert not torch.backends.cuda.matmul.allow_tf32
    with tf32_matmuls(False):
        assert not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(RuntimeError, match="stage failed"), tf32_matmuls(True):
        assert torch.backends.cuda.matmul.allow_tf32
        raise RuntimeError("stage failed")
    assert not torch.backends.cuda.matmul.allow_tf32


def test_fp32_reduction_leaves_other_setups_alone():
    for is_fsdp2, mixed_precision in ((False, "bf16"), (True, "no")):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        accelerator = SimpleNamespace(is_fsdp2=is_fsdp2, mixed_precision=mixed_precision,
                                      state=SimpleNamespace(fsdp_plugin=plugin))
        reduce_gradients_in_fp32(accelerator)
        assert plugin.mixed_precision_policy is None


def test_kill_and_resume_continues_exactly(tmp_path, tiny_models, text_file):
    raw = tiny_recipe(tiny_models, text_file, tmp_path / "unused")
    raw["stages"] = [raw["stages"][1] | {"tokens": 10 * 256}]  # one KD stage of 10 steps, a checkpoint every 2
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    kill_after(killed / "checkpoints" / "0-kd" / "step-00000004", recipe, "--output-dir", killed)
    assert not (killed / "final").exists()
    # The checkpoint holds the trained weights (the decoder layers), not the frozen embedding: resuming reads that
    # from the stage's starting folder again.
    saved = load_file(killed / "checkpoints" / "0-kd" / "step-00000004" / "model.safetensors")
    assert saved and all(name.startswith("student.model.layers.") for name in saved), sorted(saved)[:3]
    resumed = run_distill(recipe, "--output-dir", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = int(resumed.stdout.split("resumed from ")[1].split("step-")[1][:8])
    assert 4 <= start < 10
    finished = run_distill(recipe, "--output-dir", straight)
    assert finished.returncode == 0, finished.stderr[-3000:]

    def train_losses(run):
        return {r["step"]: r["loss"] for r in metrics(run) if r["split"] == "train"}

    after_kill, uninterrupted = train_losses(killed), train_losses(straight)
    assert sorted(after_kill) == list(range(1, 11))  # rows the killed run wrote past its checkpoint were dropped
    assert abs(after_kill[start + 1] - uninterrupted[start + 1]) < 1e-3
    for step in range(start + 1, 11):
        assert after_kill[step] == pytest.approx(uninterrupted[step], abs=1e-5), step
    assert not (killed / "checkpoints").exists()  # a finished stage's checkpoints are removed


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_models, text_file):
    raw = tiny_recipe(tiny_models, text_file, tmp_path / "run",
                      {"stages.0.lr": 1e30, "stages.0.max_grad_norm": None, "checkpoint.every_steps": 1})
    result = run_distill(write_recipe(tmp_path / "recipe.yaml", raw))
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("hybridize distill: error: stage 'attention' step 2: the loss is ")
    # step-00000001 holds the weights that gave that loss: it is removed, not named good.
    assert f"no checkpoint of this stage was kept (--resume starts the stage again from {tiny_models / 'init'})" in line
    assert not list((tmp_path / "run" / "checkpoints" / "0-attention").iterdir())
    assert not (tmp_path / "run" / "stages").exists() and not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("change, message", [
    ({"data.source": "/nonexistent/corpus.jsonl"}, "data.source: /nonexistent/corpus.jsonl does not exist"),
    ({"stages.0.seq_len": 100_000}, "stage 'attention': the training data"),
    ({"init": "/nonexistent/init"}, "/nonexistent/init is not a model folder"),
    ({"stages.0.memory_lr": 1e-3}, "stages[0].memory_lr applies to the recurrent branch of window_gated_deltanet"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, tiny_models, text_file, capsys, change, message):
    raw = tiny_recipe(tiny_models, text_file, tmp_path / "run", change)
    code = distill_main([str(write_recipe(tmp_path / "recipe.yaml", raw))])
    err = capsys.readouterr().err
    assert code == 2
    [line] = error_lines(err)
    assert line.startswith("hybridize distill: error: ") and message in line


@pytest.mark.parametrize("change, message", [
    ({"recurrent_rope": True}, "recipe: recurrent_rope: True, but {init} differs (it was converted with "
                               "recurrent_rope False); convert it with `hybridize convert --recurrent-rope`"),
    ({"sink_tokens": 4}, "recipe: sink_tokens: 4, but {init} differs (it was converted with sink_tokens 0)"),
    ({"memory_outside_window": True}, "recipe: memory_outside_window: True, but {init} differs (it was converted "
                                      "with memory_outside_window False); convert it with `hybridize convert "
                                      "--memory-outside-window`"),
    ({"init_long_heads": 0.25}, "recipe: init_long_heads: 0.25, but {init} differs (no conversion.json records it)"),
    ({"init_gate": "zero"}, "recipe: init_gate: zero, but {init} differs (no conversion.json records it); convert "
                            "it with `hybridize convert --init-gate zero`"),
])
def test_conversion_options_that_the_init_folder_lacks_are_one_line(tmp_path, tiny_models, text_file, capsys,
                                                                     change, message):
    raw = tiny_recipe(tiny_models, text_file, tmp_path / "run", change)
    assert distill_main([str(write_recipe(tmp_path / "recipe.yaml", raw))]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert message.format(init=tiny_models / "init") in line
    assert not (tmp_path / "run").exists()


def test_a_conversion_record_without_the_long_memory_share_is_one_line(tmp_path, tiny_models, text_file, capsys):
    init = tmp_path / "init"
    shutil.copytree(tiny_models / "init", init)
    (init / "conversion.json").write_text("[]")
    raw = tiny_recipe(tiny_models, text_file, tmp_path / "run", {"init": str(init), "init_long_heads": 0.25})
    assert distill_main([str(write_recipe(tmp_path / "recipe.yaml", raw))]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"{init / 'conversion.json'} is not a conversion record (no init_options.long_memory_heads)" in line
    assert not (tmp_path / "run").exists()


def test_an_init_folder_converted_with_other_init_options_is_one_line(tmp_path, tiny_models, text_file, capsys):
    init = tmp_path / "init"
    shutil.copytree(tiny_models / "init", init)
    (init / "conversion.json").write_text(json.dumps({"init_options": {"gate": "teacher", "decay": "slow"}}))
    raw = tiny_recipe(tiny_models, text_file, tmp_path / "run", {"init": str(init), "init_decay": "slow",
                                                                 "init_gate": "zero"})
    assert distill_main([str(write_recipe(tmp_path / "recipe.yaml", raw))]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"recipe: init_gate: zero, but {init} differs (it was converted with init_gate teacher)" in line
    assert not (tmp_path / "run").exists()


def test_a_plans_init_options_come_from_the_recipe(tmp_path, tiny_models, text_file):
    """init_gate / init_decay / init_beta are convert's --init-gate / --init-decay / --init-beta: the run converts its
    plan with them and records them; one left unset keeps the convert default."""
    run = tmp_path / "run"
    raw = tiny_recipe(tiny_models, text_file, run, {"plan": "uniform:2:gated_deltanet", "init": None,
                                                    "init_gate": "teacher", "init_decay": "teacher"})
    assert distill_main([str(write_recipe(tmp_path / "recipe.yaml", raw)), "--max-steps", "1"]) == 0
    options = json.loads((run / "init" / "conversion.json").read_text())["init_options"]
    assert (options["gate"], options["decay"], options["beta"]) == ("teacher", "teacher", CONVERT_DEFAULTS.beta)
    assert CONVERT_DEFAULTS.gate != "teacher" and CONVERT_DEFAULTS.decay != "teacher"  # else this shows nothing
    init = load_file(run / "init" / "model.safetensors")
    layers = [i for i, kind in enumerate(json.loads((run / "init" / "config.json").read_text())["layer_types"])
              if kind == "gated_deltanet"]
    assert layers
    for layer in layers:  # teacher decay, not the default's: exp(A_log) * softplus(dt_bias) is not 0.01 a token
        prefix = f"model.layers.{layer}.mixer."
        rate = init[prefix + "A_log"].float().exp() * F.softplus(init[prefix + "dt_bias"].float())
        assert not torch.allclose(rate, torch.full_like(rate, 0.01), rtol=1e-3), rate


def test_conversion_options_that_the_init_folder_holds_are_accepted(tmp_path, tiny_models, text_file):
    """A folder converted with recurrent RoPE, sinks and long-memory heads trains under a recipe that names them."""
    init = tmp_path / "init"
    shutil.copytree(tiny_models / "init", init)
    config = json.loads((init / "config.json").read_text())
    (init / "config.json").write_text(json.dumps(config | {"recurrent_rope": True, "sliding_window_sinks": 4}))
    (init / "conversion.json").write_text(json.dumps({"init_options": {"long_memory_heads": 0.25}}))
    raw = tiny_recipe(tiny_models, text_file, tmp_path / "run",
                      {"init": str(init), "recurrent_rope": True, "sink_tokens": 4, "init_long_heads": 0.25})
    result = run_distill(write_recipe(tmp_path / "recipe.yaml", raw), "--max-steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["recurrent_rope"] is True


def test_an_existing_run_needs_resume_and_the_same_recipe(tmp_path, tiny_models, text_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    started = parse_recipe(tiny_recipe(tiny_models, text_file, out))
    (out / "run.json").write_text(json.dumps({"recipe": recipe_to_dict(started)}))
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny_models, text_file, out))
    assert distill_main([str(recipe)]) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err
    changed = tiny_recipe(tiny_models, text_file, out, {"stages.1.seq_len": 32})
    changed = write_recipe(tmp_path / "changed.yaml", changed)
    assert distill_main([str(changed), "--resume"]) == 2
    assert "the recipe's stages[1].seq_len is 32, but the run" in capsys.readouterr().err


def test_accelerate_launch_two_cpu_processes_and_the_result_generates(tmp_path, tiny_models, text_file):
    import hybridize.model  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny_models, text_file, tmp_path / "run"))
    accelerate = REPO / ".venv" / "bin" / "accelerate"
    command = [str(accelerate) if accelerate.exists() else "accelerate", "launch", "--config_file",
               "recipes/accelerate/ddp.yaml", "-m", "hybridize.distill", str(recipe), "--max-steps", "2"]
    # DDP over gloo on two CPU processes: accelerate takes the CPU from this flag, not from --cpu (one process only).
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    final = tmp_path / "run" / "final"
    record = json.loads((final / "distill.json").read_text())
    assert record["processes"] == 2 and record["distributed"].endswith("MULTI_CPU")
    assert [s["steps_done"] for s in record["stages"]] == [2, 2]
    assert all(s["stopped_early_by_max_steps"] for s in record["stages"])
    if "tensorboard is not installed" in result.stderr:  # the fallback: one warning line, the run goes on
        assert len([line for line in result.stderr.splitlines() if "tensorboard is not installed" in line]) == 1
    else:
        assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer("def main():", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 4)
    assert type(model).__name__ == "HybridForCausalLM" and model.config.layer_types[1] == "full_attention"


def test_the_hybridize_command_runs_distill(tmp_path, capsys):
    assert COMMANDS["distill"][0] == "hybridize.distill.cli"
    assert hybridize_main(["distill", str(tmp_path / "missing.yaml")]) == 2
    [line] = error_lines(capsys.readouterr().err)
    missing = tmp_path / "missing.yaml"
    assert line == f"hybridize distill: error: recipe {missing}: cannot read it (No such file or directory)"
