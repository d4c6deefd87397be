"""The on_policy stage: its divergences, the generated batch's loss mask, generation by the student alone and
reproducible from the seed, exact resume, a smoke run through the CLI, and its recipe checks."""

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_cuda
from distill_support import REPO, distill_command, metrics, run_distill, tiny_recipe, wait_for, write_recipe

from hybridize.distill.export import load_student
from hybridize.losses import KDOptions, kd_loss
from hybridize.distill.on_policy import (
    ContinuationSampler, TeacherContinuations, generated_loss_mask, sampling_uniforms, step_generates,
)
from hybridize.distill.recipe import OnPolicyStage, load_recipe, parse_recipe
from hybridize.distill.stages import OnPolicyDistiller
from hybridize.distill.trainer import Trainer
from hybridize.errors import UserError
from hybridize.model.compiling import compile_decoder_layers
from hybridize.model.fast_decode import StaticDecoder
from hybridize.model.sampling import Sampling, choose_tokens
from hybridize.teacher import load_teacher

ON_POLICY = {"name": "onpolicy", "kind": "on_policy", "tokens": 4 * 64, "seq_len": 24, "prompt_tokens": 12,
             "new_tokens": 12, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "kl_chunk_tokens": 20}


def stage(**changes) -> OnPolicyStage:
    raw = {"teacher": "t", "init": "i", "output_dir": "o", "stages": [ON_POLICY | changes]}
    return parse_recipe(raw).stages[0]


def direct_divergence(teacher_logits, student_logits, divergence: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence from the definitions, with torch's own softmax and kl_div."""
    log_p, log_q = F.log_softmax(teacher_logits, -1), F.log_softmax(student_logits, -1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731  KL(a || b) from log-probabilities
    if divergence == "forward_kl":
        return kl(log_p, log_q)
    if divergence == "reverse_kl":
        return kl(log_q, log_p)
    log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def fused_divergence(teacher_logits, student_logits, options: KDOptions, mask=None):
    """kd_loss on logits: hidden states [N, V] under an identity head give the logits themselves."""
    eye = torch.eye(student_logits.shape[1], dtype=student_logits.dtype)
    return kd_loss(student_logits, eye, teacher_logits, eye, None, options, mask)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_each_divergence_and_its_gradient_match_the_definition(divergence):
    torch.manual_seed(0)
    teacher_logits = 3 * torch.randn(7, 11, dtype=torch.float64)
    student_logits = (3 * torch.randn(7, 11, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([True, False, True, True, False, True, True])
    tau, beta = 2.0, 0.3
    options = KDOptions(temperature=tau, divergence=divergence, jsd_beta=beta, chunk_tokens=3)  # 3 chunks, the last short
    fused = fused_divergence(teacher_logits, student_logits, options, mask)
    rows = direct_divergence(teacher_logits / tau, student_logits / tau, divergence, beta)
    expected = tau**2 * rows[mask].mean()
    torch.testing.assert_close(fused.loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(fused.kl, rows[mask].mean(), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(fused.loss, student_logits)
    (reference,) = torch.autograd.grad(expected, student_logits)
    torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-14)
    assert grad[~mask].abs().max() == 0  # rows outside the mask get no gradient at all


def test_forward_kl_without_a_mask_is_the_kd_stage_loss():
    torch.manual_seed(1)
    teacher_logits, student_logits = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    every_row = fused_divergence(teacher_logits, student_logits, KDOptions(), torch.ones(5, dtype=torch.bool))
    no_mask = fused_divergence(teacher_logits, student_logits, KDOptions())
    torch.testing.assert_close(every_row.loss, no_mask.loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(no_mask.loss, direct_divergence(teacher_logits, student_logits, "forward_kl").mean())


def test_the_jsd_tends_to_the_forward_and_reverse_kl_at_its_beta_limits():
    torch.manual_seed(2)
    teacher_logits, student_logits = 2 * torch.randn(4, 13, dtype=torch.float64), torch.randn(4, 13, dtype=torch.float64)
    forward = direct_divergence(teacher_logits, student_logits, "forward_kl").mean()
    reverse = direct_divergence(teacher_logits, student_logits, "reverse_kl").mean()
    for beta in (1e-3, 1e-5):
        small = fused_divergence(teacher_logits, student_logits, KDOptions(divergence="jsd", jsd_beta=beta)).kl
        large = fused_divergence(teacher_logits, student_logits, KDOptions(divergence="jsd", jsd_beta=1 - beta)).kl
        # The next term of each expansion is O(beta) relative to the limit (a chi-square of the two distributions,
        # here below 50 times the KL), so the relative gap shrinks in step with beta.
        assert abs(small / beta / forward - 1) < 50 * beta
        assert abs(large / beta / reverse - 1) < 50 * beta


def test_the_loss_mask_covers_the_rows_that_predict_generated_tokens_up_to_the_first_eos():
    eos, prompt = 0, 3
    sequences = torch.tensor([
        [5, 6, 7, 8, 9, 0, 4, 0],  # continuation 8 9 eos, then padding 4 0
        [5, 0, 7, 8, 9, 4, 4, 4],  # an eos inside the prompt ends nothing
        [5, 6, 7, 0, 9, 4, 4, 4],  # the first generated token is eos
    ])
    mask = generated_loss_mask(sequences, prompt, eos)
    # Row r predicts token r + 1: rows 2.. predict the generated tokens; the last row predicts nothing.
    assert mask.tolist() == [
        [False, False, True, True, True, False, False, False],
        [False, False, True, True, True, True, True, False],
        [False, False, True, False, False, False, False, False],
    ]
    assert generated_loss_mask(sequences, prompt, None)[0].tolist() == [False] * 2 + [True] * 5 + [False]


@pytest.fixture(scope="module")
def models(tiny_models):
    teacher, _ = load_teacher(str(tiny_models / "teacher"), dtype=torch.float32)
    return load_student(tiny_models / "init").eval(), teacher.eval()


def test_the_on_policy_loss_is_the_divergence_on_the_generated_rows_only(models):
    student, teacher = models
    config = stage(divergence="reverse_kl", temperature=1.5)
    distiller = OnPolicyDistiller(student, teacher, config, static_decode=False)
    torch.manual_seed(3)
    sequences = torch.randint(1, 1000, (2, config.seq_len))
    sequences[1, 17] = 0  # the second continuation ends at eos
    mask = generated_loss_mask(sequences, config.prompt_tokens, eos=0)
    loss, parts = distiller(sequences, loss_mask=mask)
    with torch.no_grad():
        rows = direct_divergence(teacher(sequences).logits / 1.5, student(sequences).logits / 1.5, "reverse_kl")
    # rows 11..22 predict the 12 generated tokens; in the second sequence rows past 16 predict padding
    expected_rows = torch.cat([rows[0, 11:23], rows[1, 11:17]])
    torch.testing.assert_close(parts["divergence"], expected_rows.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, 1.5**2 * expected_rows.mean(), rtol=1e-5, atol=0)


def reference_continuations(model, prompts, uniforms, sampling):
    """No cache at all: the whole sequence through the model for every new token."""
    sequences = prompts
    with torch.no_grad():
        for j in range(uniforms.shape[1]):
            logits = model(sequences, use_cache=False).logits[:, -1]
            sequences = torch.cat([sequences, choose_tokens(logits, uniforms[:, j], sampling)], 1)
    return sequences


@pytest.mark.parametrize("sampling", [dict(sample_temperature=1.0), dict(sample_temperature=0.7, top_k=40, top_p=0.9),
                                      dict(sample_temperature=0.0)], ids=["plain", "top-k-top-p", "greedy"])
def test_static_and_cached_decode_sample_the_students_own_tokens(models, sampling):
    student, teacher = models
    config = stage(**sampling)
    torch.manual_seed(4)
    prompts = torch.randint(1, 1000, (2, config.prompt_tokens))
    uniforms = sampling_uniforms(seed=0, stage_index=0, first_position=8, count=2, new_tokens=config.new_tokens)
    expected = reference_continuations(student, prompts, uniforms, Sampling(
        config.sample_temperature, config.top_k, config.top_p))
    static = ContinuationSampler(student, config, static=True)(prompts, uniforms)
    cached = ContinuationSampler(student, config, static=False)(prompts, uniforms)
    assert torch.equal(static, expected) and torch.equal(cached, expected)
    # Through the distiller, with any teacher: the teacher's logits play no part in what is sampled.
    for static_decode in (True, False):
        for judge in (teacher, load_teacher_with_other_weights(teacher)):
            generated = OnPolicyDistiller(student, judge, config, static_decode)(prompts, sample_uniforms=uniforms)
            assert torch.equal(generated, expected)
    if sampling["sample_temperature"] > 0:  # the teacher would have chosen other tokens
        assert not torch.equal(reference_continuations(teacher, prompts, uniforms, Sampling(
            config.sample_temperature, config.top_k, config.top_p)), expected)


@pytest.mark.parametrize("sampling", [dict(sample_temperature=1.0), dict(sample_temperature=0.0)],
                         ids=["plain", "greedy"])
def test_the_teacher_as_generator_samples_the_teachers_own_tokens(models, sampling):
    """generator: teacher gives the teacher's no-cache continuations, whatever the student's weights."""
    student, teacher = models
    config = stage(generator="teacher", **sampling)
    torch.manual_seed(5)
    prompts = torch.randint(1, 1000, (2, config.prompt_tokens))
    uniforms = sampling_uniforms(seed=0, stage_index=0, first_position=4, count=2, new_tokens=config.new_tokens)
    expected = reference_continuations(teacher, prompts, uniforms, Sampling(config.sample_temperature))
    assert torch.equal(TeacherContinuations(teacher, config)(prompts, uniforms), expected)
    for learner in (student, load_teacher_with_other_weights(student)):
        generated = OnPolicyDistiller(learner, teacher, config, static_decode=True)(prompts, sample_uniforms=uniforms)
        assert torch.equal(generated, expected)
    assert not torch.equal(reference_continuations(student, prompts, uniforms, Sampling(config.sample_temperature)),
                           expected)  # the student would have continued otherwise


def test_the_teacher_generates_eager_through_its_compiled_layers(models):
    """The trainer compiles the teacher's layers; its continuations must not trace the cache loop (a graph per layer
    index and cache length) and must equal the eager teacher's."""
    _, teacher = models
    compiled = copy.deepcopy(teacher)
    compile_decoder_layers(compiled, backend="aot_eager")
    config = stage(generator="teacher")
    prompts = torch.randint(1, 1000, (2, config.prompt_tokens), generator=torch.Generator().manual_seed(6))
    uniforms = sampling_uniforms(seed=0, stage_index=0, first_position=0, count=2, new_tokens=config.new_tokens)
    frames = torch._dynamo.utils.counters["frames"]["total"]
    generated = TeacherContinuations(compiled, config)(prompts, uniforms)
    assert torch._dynamo.utils.counters["frames"]["total"] == frames
    assert torch.equal(generated, TeacherContinuations(teacher, config)(prompts, uniforms))


def load_teacher_with_other_weights(teacher):
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param))
    return other


def test_sampling_draws_each_token_with_its_probability():
    """Uniforms on an even grid of K points: each token is chosen for its probability's share of them, to one point."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0, -3.0]])
    count = 20_000
    grid = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    for sampling in (Sampling(1.0), Sampling(0.5), Sampling(1.0, top_k=3), Sampling(1.0, top_p=0.8)):
        probs = torch.softmax(logits[0].double() / sampling.temperature, -1)
        if sampling.top_k:
            probs[probs < probs.topk(sampling.top_k).values[-1]] = 0
        if sampling.top_p < 1:
            ordered, order = probs.sort(descending=True)
            probs[order[(ordered.cumsum(0) - ordered) >= sampling.top_p]] = 0
        probs /= probs.sum()
        chosen = choose_tokens(logits.expand(count, -1), grid, sampling)[:, 0]
        counts = torch.bincount(chosen, minlength=logits.shape[1]).double()
        # one grid point either way, plus what fp32 rounding of the cdf (~1e-7 of K) moves
        assert (counts - probs * count).abs().max() <= 1.01, (sampling, counts, probs * count)


def test_draws_depend_only_on_seed_stage_step_and_stream_position():
    first = sampling_uniforms(seed=0, stage_index=1, first_position=10, count=3, new_tokens=5)
    assert torch.equal(first, sampling_uniforms(0, 1, 10, 3, 5))
    # A micro batch starting one position later shares two sequences' draws: the draw is the sequence's, not the batch's
    assert torch.equal(sampling_uniforms(0, 1, 11, 3, 5)[:2], first[1:])
    assert not torch.equal(sampling_uniforms(1, 1, 10, 3, 5), first)
    assert not torch.equal(sampling_uniforms(0, 2, 10, 3, 5), first)
    kinds = [step_generates(0, 0, step, 0.5) for step in range(200)]
    assert kinds == [step_generates(0, 0, step, 0.5) for step in range(200)]
    assert 70 < sum(kinds) < 130  # about half, by a fixed draw per step
    assert all(step_generates(0, 0, s, 1.0) for s in range(20)) and not any(step_generates(0, 0, s, 0.0) for s in range(20))


def on_policy_recipe(tiny_models, text_file, out, **changes) -> dict:
    """One on_policy stage over the tiny models: 6 steps of 4 sequences of 12 prompt + 12 new tokens."""
    raw = tiny_recipe(tiny_models, text_file, out)
    raw["stages"] = [ON_POLICY | {"tokens": 6 * 4 * 24} | changes]
    return raw


def test_a_mixed_stage_trains_and_reports_its_generation_cost(tmp_path, tiny_models, text_file):
    raw = on_policy_recipe(tiny_models, text_file, tmp_path / "run", on_policy_fraction=0.5, divergence="jsd",
                           lr=3e-3)
    final = Trainer(parse_recipe(raw)).run()
    train = [r for r in metrics(tmp_path / "run") if r["split"] == "train"]
    kinds = [r["on_policy"] for r in train]
    assert kinds == [float(step_generates(0, 0, step, 0.5)) for step in range(6)] and 0 < sum(kinds) < 6
    for row in train:
        assert 0 <= row["generation_share"] < 1 and ("generated_tokens_per_s" in row) == bool(row["on_policy"])
        assert row["generation_share"] > 0 or not row["on_policy"]
    summary = json.loads((final / "stage.json").read_text())
    assert summary["kind"] == "on_policy" and summary["on_policy_steps"] == sum(kinds)
    assert summary["generated_tokens_per_s_median"] > 0 and 0 < summary["generation_share_mean"] < 1
    evals = [r for r in metrics(tmp_path / "run") if r["split"] == "eval"]
    assert evals[-1]["divergence"] < evals[0]["divergence"], evals


def test_a_stage_trains_on_the_teachers_continuations(tmp_path, tiny_models, text_file, tokenizer, models):
    """generator: teacher trains the student on what the teacher wrote: another first loss than on the student's own
    continuations at the same draws, and afterwards the student is closer to the teacher on the teacher's greedy
    continuations of text prompts."""
    first = {}
    for generator in ("student", "teacher"):
        raw = on_policy_recipe(tiny_models, text_file, tmp_path / generator, generator=generator,
                               sample_temperature=0.0, divergence="forward_kl", lr=3e-3)
        Trainer(parse_recipe(raw)).run()
        train = [r for r in metrics(tmp_path / generator) if r["split"] == "train"]
        assert [r["on_policy"] for r in train] == [1.0] * 6
        first[generator] = train[0]["loss"]
    assert first["teacher"] != pytest.approx(first["student"], rel=1e-3)
    _, teacher = models
    config = stage(generator="teacher", sample_temperature=0.0, divergence="forward_kl")
    texts = [json.loads(line)["text"] for line in text_file.read_text().splitlines()[:8]]
    prompts = torch.stack([torch.tensor(tokenizer(t)["input_ids"][: config.prompt_tokens]) for t in texts])
    uniforms = sampling_uniforms(seed=0, stage_index=0, first_position=0, count=8, new_tokens=config.new_tokens)
    divergences = []
    for folder in (tiny_models / "init", tmp_path / "teacher" / "final"):
        distiller = OnPolicyDistiller(load_student(folder).eval(), teacher, config, static_decode=False)
        with torch.no_grad():
            sequences = distiller(prompts, sample_uniforms=uniforms)
            mask = generated_loss_mask(sequences, config.prompt_tokens, tokenizer.eos_token_id)
            divergences.append(distiller(sequences, loss_mask=mask)[1]["divergence"].item())
    assert divergences[1] < divergences[0], divergences


def test_kill_and_resume_gives_the_same_next_steps(tmp_path, tiny_models, text_file):
    """Killed after a checkpoint, resumed: the same steps generate, from the same draws, to the same losses."""
    raw = on_policy_recipe(tiny_models, text_file, tmp_path / "unused", on_policy_fraction=0.7, tokens=8 * 4 * 24,
                           sample_temperature=1.0, top_p=0.95)
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    process = subprocess.Popen(distill_command(recipe, "--output-dir", killed), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(killed / "checkpoints" / "0-onpolicy" / "step-00000004", process)
    finally:
        process.send_signal(signal.SIGKILL)  # no cleanup, no final save
        process.wait()
    assert not (killed / "final").exists()
    resumed = run_distill(recipe, "--output-dir", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = int(resumed.stdout.split("resumed from ")[1].split("step-")[1][:8])
    assert 4 <= start < 8
    finished = run_distill(recipe, "--output-dir", straight)
    assert finished.returncode == 0, finished.stderr[-3000:]

    def train_rows(run):
        return {r["step"]: r for r in metrics(run) if r["split"] == "train"}

    after_kill, uninterrupted = train_rows(killed), train_rows(straight)
    assert sorted(after_kill) == list(range(1, 9))
    assert any(uninterrupted[step]["on_policy"] for step in range(start + 1, 9))
    for step in range(start + 1, 9):
        assert after_kill[step]["on_policy"] == uninterrupted[step]["on_policy"]
        assert after_kill[step]["loss"] == uninterrupted[step]["loss"], step  # bit-exact: the same draws and weights


def test_a_smoke_run_through_the_cli(tmp_path, tiny_models, text_file):
    raw = on_policy_recipe(tiny_models, text_file, tmp_path / "unused", prompt_tokens=64, new_tokens=64, seq_len=128)
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    result = run_distill(recipe, "--smoke", "--output-dir", tmp_path / "smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    train = [r for r in metrics(tmp_path / "smoke") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["on_policy"] == 1.0 for r in train)
    assert all(r["tokens"] == r["step"] * 2 * 32 for r in train)  # smoke: 2 sequences of 16 + 16 tokens
    assert all(r["generated_tokens_per_s"] > 0 and 0 < r["generation_share"] < 1 for r in train)
    record = json.loads((tmp_path / "smoke" / "final" / "distill.json").read_text())
    assert record["recipe"]["stages"][0]["prompt_tokens"] == 16 and record["stages"][0]["steps_done"] == 2


@pytest.mark.parametrize("change, line", [
    ({"seq_len": 30}, "stages[0].seq_len: must equal prompt_tokens + new_tokens (12 + 12 = 24)"),
    ({"divergence": "kl"}, "stages[0].divergence: allowed values: forward_kl, reverse_kl, jsd; got 'kl'"),
    ({"jsd_beta": 1.0}, "stages[0].jsd_beta: must be in (0, 1) (forward_kl and reverse_kl are its limits), got 1"),
    ({"on_policy_fraction": 1.5}, "stages[0].on_policy_fraction: must be in [0, 1], got 1.5"),
    ({"sample_temperature": -1}, "stages[0].sample_temperature: must be in [0, 100] (0: greedy), got -1"),
    ({"top_p": 0}, "stages[0].top_p: must be in (0, 1] (1: no cut), got 0"),
    ({"top_k": -5}, "stages[0].top_k: must be >= 0 (0: no limit), got -5"),
    ({"new_tokens": 0, "seq_len": 12}, "stages[0].new_tokens: must be >= 1, got 0"),
    ({"ce_weight": 0.5}, "stages[0].ce_weight: unknown key; allowed:"),
    ({"generator": "both"}, "stages[0].generator: allowed values: student, teacher; got 'both'"),
])
def test_bad_on_policy_values_are_one_line_naming_the_key(change, line):
    raw = {"teacher": "t", "init": "i", "output_dir": "o", "stages": [ON_POLICY | change]}
    with pytest.raises(UserError) as caught:
        parse_recipe(raw)
    assert line in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_on_policy_value_is_one_line_from_the_cli(tmp_path, tiny_models, text_file):
    raw = on_policy_recipe(tiny_models, text_file, tmp_path / "out", divergence="kl")
    result = run_distill(write_recipe(tmp_path / "recipe.yaml", raw), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"hybridize distill: error: recipe {tmp_path / 'recipe.yaml'}: stages[0].divergence: allowed values: "
        "forward_kl, reverse_kl, jsd; got 'kl'"]
    assert not (tmp_path / "out").exists()


VARIANTS = {"windows-sinks-onpolicy": "windows-sinks", "gdn-onpolicy": "gdn"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_on_policy_variants_train_on_their_base_recipes_tokens(variant):
    folder = REPO / "recipes" / "smollm2-135m"
    recipe, base = load_recipe(folder / f"{variant}.yaml"), load_recipe(folder / f"{VARIANTS[variant]}.yaml")
    assert sum(s.tokens for s in recipe.stages) == sum(s.tokens for s in base.stages)
    assert [s.KIND for s in recipe.stages] == [s.KIND for s in base.stages] + ["on_policy"]
    assert recipe.stages[:-2] == base.stages[:-1] and recipe.plan == base.plan
    conversion = lambda r: (r.recurrent_rope, r.init_long_heads, r.init_gate, r.init_decay, r.init_beta)  # noqa: E731
    assert conversion(recipe) == conversion(base)
    assert recipe.stages[-2].tokens == base.stages[-1].tokens - recipe.stages[-1].tokens


def test_ddp_on_two_cpu_processes_generates_the_same_sequences_as_one(tmp_path, tiny_models, text_file):
    """The draws belong to stream positions, not to processes: under DDP the first step's loss is one process's."""
    raw = on_policy_recipe(tiny_models, text_file, tmp_path / "unused", tokens=2 * 4 * 24, sample_temperature=1.0)
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    accelerate = Path(sys.executable).parent / "accelerate"  # the launcher of the interpreter running the tests
    command = [str(accelerate) if accelerate.exists() else "accelerate", "launch", "--config_file",
               "recipes/accelerate/ddp.yaml", "-m", "hybridize.distill", str(recipe), "--output-dir", tmp_path / "ddp"]
    result = subprocess.run(list(map(str, command)), cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "true"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    single = run_distill(recipe, "--output-dir", tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp, one = ([r for r in metrics(tmp_path / run) if r["split"] == "train"] for run in ("ddp", "single"))
    assert json.loads((tmp_path / "ddp" / "final" / "distill.json").read_text())["processes"] == 2
    assert [r["on_policy"] for r in ddp] == [r["on_policy"] for r in one] == [1.0, 1.0]
    # Micro batches of 2 sequences either way, so the same mean of means; only the reduction order differs.
    assert ddp[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    assert ddp[0]["divergence"] == pytest.approx(one[0]["divergence"], rel=1e-5)


@requires_cuda
@pytest.mark.parametrize("compile_step", [False, True])
def test_the_captured_sampling_step_on_cuda_draws_what_the_eager_step_draws(models, compile_step):
    """fp32, as the stage decodes: the CUDA graph reads the uniforms from its buffer, replay after replay."""
    student = models[0].to("cuda")
    try:
        config = stage(sample_temperature=1.0, top_p=0.95)
        prompts = torch.randint(1, 1000, (2, config.prompt_tokens), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(5))
        sampling = Sampling(config.sample_temperature, config.top_k, config.top_p)
        eager = StaticDecoder(student, 2, config.seq_len, use_cuda_graph=False, compile_step=False, sampling=sampling)
        graphed = StaticDecoder(student, 2, config.seq_len, compile_step=compile_step, sampling=sampling,
                                log=pytest.fail)
        for first in (0, 2):  # a second call with other draws: the buffer, not the capture, holds them
            uniforms = sampling_uniforms(0, 0, first, 2, config.new_tokens).cuda()
            expected = eager.generate(prompts, config.new_tokens, uniforms=uniforms)
            tokens = graphed.generate(prompts, config.new_tokens, uniforms=uniforms)
            # compiled kernels round differently, which can move a draw that falls on a cdf step by one token
            agree = (tokens == expected).float().mean().item()
            assert agree == 1.0 if not compile_step else agree > 0.9
    finally:
        student.to("cpu")


@requires_cuda
def test_a_stage_on_cuda_decodes_compiled_and_trains_in_bf16(tmp_path, tiny_models, text_file):
    raw = on_policy_recipe(tiny_models, text_file, tmp_path / "run", on_policy_fraction=0.5, tokens=4 * 4 * 24)
    Trainer(parse_recipe(raw)).run()
    train = [r for r in metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(train) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert any(r["on_policy"] for r in train) and all(r["generated_tokens_per_s"] > 0 for r in train if r["on_policy"])
