"""The teacher-calibrated init: statistics -> parameters on cases with known answers, the statistics of a real
(tiny, random) Llama, the fit to the teacher's attention output, and determinism."""

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.convert.build import convert_state, hybrid_config_from_teacher, model_from_state
from hybridize.convert.calibrate import calibrate_student, least_squares_head_scales, teacher_calibration
from hybridize.convert.init import (
    BETA_RANGE, LONG_MEMORY_HALF_LIFE, MIN_HALF_LIFE, TEACHER_CALIBRATED, InitOptions, attention_to_gated_deltanet,
    beta_bias_from_entropy, decay_from_distance, with_long_memory,
)
from hybridize.convert.statistics import SINK_TOKENS, head_statistics
from hybridize.errors import UserError
from hybridize.teacher_forcing import capture_mixer_io, relative_error, student_mixer_outputs
from helpers import requires_cuda

EPS = torch.finfo(torch.float32).eps


def decay_per_token(a_log, dt_bias):
    return torch.exp(-torch.exp(a_log) * F.softplus(dt_bias))


def test_half_life_equals_the_mean_distance():
    distance = torch.tensor([MIN_HALF_LIFE, 3.0, 40.0, 500.0])
    a_log, dt_bias = decay_from_distance(distance)
    assert torch.equal(a_log, torch.zeros(4))
    # a^d = 1/2; the fp32 error of exp(-d * softplus(.)) grows with d * ln 2 / d = ln 2, so a few eps of 1/2
    torch.testing.assert_close(decay_per_token(a_log, dt_bias) ** distance, torch.full((4,), 0.5),
                               rtol=0, atol=64 * EPS)
    # a head that only reads the current token (distance 0) keeps a one-token half-life, not a zero state
    assert decay_per_token(*decay_from_distance(torch.tensor([0.0]))).item() == pytest.approx(0.5, abs=8 * EPS)


def test_beta_runs_from_sharp_to_uniform_heads():
    beta = torch.sigmoid(beta_bias_from_entropy(torch.tensor([0.0, 0.5, 1.0])))
    torch.testing.assert_close(beta, torch.tensor([BETA_RANGE[0], sum(BETA_RANGE) / 2, BETA_RANGE[1]]),
                               rtol=0, atol=8 * EPS)


def local_attention(length: int, offsets: list[int]) -> torch.Tensor:
    """[1, H, T, T] probabilities: head h puts all its non-sink mass on token t - offsets[h] (clamped past the sink)
    and a fixed half of the mass on the sink, which the statistics must ignore."""
    probs = torch.zeros(1, len(offsets), length, length)
    for h, offset in enumerate(offsets):
        for t in range(length):
            probs[0, h, t, max(t - offset, SINK_TOKENS if t >= SINK_TOKENS else 0)] += 0.5
            probs[0, h, t, 0] += 0.5
    return probs


def test_exactly_local_attention_gives_its_distance_and_zero_entropy():
    length = 64
    stats = head_statistics(local_attention(length, [0, 1, 5]))
    # queries t >= SINK + 1 are measured; head 5's target is clamped to the first non-sink key for t < 6
    rows = torch.arange(SINK_TOKENS + 1, length, dtype=torch.float32)
    want_5 = torch.minimum(rows - SINK_TOKENS, torch.tensor(5.0)).mean()
    torch.testing.assert_close(stats.mean_distance, torch.stack([torch.tensor(0.0), torch.tensor(1.0), want_5]))
    torch.testing.assert_close(stats.entropy, torch.zeros(3), rtol=0, atol=1e-6)


def test_uniform_attention_has_entropy_one_and_mean_distance_half_the_past():
    length = 32
    probs = torch.ones(length, length).tril()
    probs = (probs / probs.sum(-1, keepdim=True))[None, None]  # [1, 1, T, T]
    stats = head_statistics(probs)
    rows = torch.arange(SINK_TOKENS + 1, length, dtype=torch.float32)
    torch.testing.assert_close(stats.mean_distance, ((rows - SINK_TOKENS) / 2).mean()[None])
    torch.testing.assert_close(stats.entropy, torch.ones(1))


def test_local_teacher_heads_map_to_their_decay_and_beta():
    """Statistics of exactly local attention, through the GDN initializer: the parameters the docs promise."""
    teacher = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    stats = head_statistics(local_attention(128, [1, 2, 4, 8]))
    g = torch.Generator().manual_seed(0)
    attention = {f"{n}.weight": torch.randn(r, 32, generator=g) for n, r in
                 (("q_proj", 32), ("k_proj", 16), ("v_proj", 16), ("o_proj", 32))}
    config = hybrid_config_from_teacher(teacher, ["gated_deltanet"])
    out = attention_to_gated_deltanet(attention, config, TEACHER_CALIBRATED, g, stats)
    half_life = math.log(0.5) / torch.log(decay_per_token(out["A_log"], out["dt_bias"]))
    torch.testing.assert_close(half_life, stats.mean_distance, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.sigmoid(out["b_bias"]), torch.full((4,), BETA_RANGE[0]), rtol=0, atol=1e-6)
    assert torch.equal(out["g_proj.weight"], out["v_proj.weight"]) and not out["b_proj.weight"].any()
    with pytest.raises(ValueError, match="HeadStatistics"):
        attention_to_gated_deltanet(attention, config, TEACHER_CALIBRATED, g, None)


def test_long_memory_heads_get_the_long_half_life_and_the_rest_keep_theirs():
    """The share's longest-distance heads (rounded up, ties by index) get LONG_MEMORY_HALF_LIFE, through the GDN
    initializer; the others keep their mean distance."""
    teacher = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    stats = head_statistics(local_attention(128, [8, 1, 4, 2]))  # mean distances 8, 1, 4, 2
    g = torch.Generator().manual_seed(0)
    attention = {f"{n}.weight": torch.randn(r, 32, generator=g) for n, r in
                 (("q_proj", 32), ("k_proj", 16), ("v_proj", 16), ("o_proj", 32))}
    config = hybrid_config_from_teacher(teacher, ["gated_deltanet"])
    for share, long_heads in ((0.0, []), (0.25, [0]), (0.3, [0, 2]), (0.5, [0, 2]), (1.0, [0, 1, 2, 3])):
        options = replace(TEACHER_CALIBRATED, long_memory_heads=share)
        out = attention_to_gated_deltanet(attention, config, options, g, stats)
        half_life = math.log(0.5) / torch.log(decay_per_token(out["A_log"], out["dt_bias"]).double())
        want = stats.mean_distance.double().clone()
        want[long_heads] = LONG_MEMORY_HALF_LIFE
        torch.testing.assert_close(half_life, want, rtol=1e-4, atol=0)
    assert with_long_memory(torch.ones(30), 0.1).eq(LONG_MEMORY_HALF_LIFE).sum() == 3  # not 4 from 0.1 * 30 > 3
    with pytest.raises(UserError, match="long_memory_heads"):
        InitOptions(decay="slow", long_memory_heads=0.25)
    with pytest.raises(UserError, match="long_memory_heads"):
        replace(TEACHER_CALIBRATED, long_memory_heads=1.5)


def test_least_squares_scales_recover_known_factors():
    g = torch.Generator().manual_seed(0)
    contributions = torch.randn(200, 3, 16, generator=g)  # [N, H, C]
    scales = torch.tensor([0.5, -2.0, 3.0])
    target = (contributions * scales[None, :, None]).sum(1)
    # the ridge biases the solution by about SCALE_RIDGE relative; well-conditioned random features otherwise exact
    torch.testing.assert_close(least_squares_head_scales(contributions, target), scales, rtol=1e-3, atol=0)


def test_bad_option_values_are_refused():
    with pytest.raises(UserError, match="beta='sharp'"):
        InitOptions(beta="sharp")
    with pytest.raises(UserError, match="align_steps=-1"):
        InitOptions(align_steps=-1)


TINY = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
                   attn_implementation="eager")
TINY_PLAN = ["gated_deltanet", "full_attention", "mamba2"]


@pytest.fixture(scope="module")
def tiny_teacher():
    """A random Llama with large enough q/k weights (initializer_range 0.2) that its heads are not all uniform."""
    torch.manual_seed(0)
    return LlamaForCausalLM(TINY).eval()


def token_batch(seed: int) -> torch.LongTensor:
    return torch.randint(0, TINY.vocab_size, (2, 48), generator=torch.Generator().manual_seed(seed))


def test_statistics_use_the_teachers_own_attention_probabilities(tiny_teacher):
    ids = token_batch(0)
    _, stats = teacher_calibration(tiny_teacher, ids, [0, 2])
    with torch.no_grad():
        attentions = tiny_teacher(input_ids=ids, output_attentions=True).attentions
    for i in (0, 2):
        want = head_statistics(attentions[i].float())
        torch.testing.assert_close(stats[i].mean_distance, want.mean_distance, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats[i].entropy, want.entropy, rtol=1e-4, atol=1e-5)
    assert stats[0].mean_distance.shape == (TINY.num_attention_heads,)


def calibrated_student(teacher, options: InitOptions, fit_ids: torch.LongTensor, seed: int = 0):
    layers = [i for i, kind in enumerate(TINY_PLAN) if kind != "full_attention"]
    fitting, statistics = teacher_calibration(teacher, fit_ids, layers)
    config = hybrid_config_from_teacher(teacher.config, TINY_PLAN, dtype=torch.float32)
    state = teacher.state_dict()
    student_state, _ = convert_state(list(state), lambda k: state[k].detach().clone(), config, options, seed,
                                     statistics if options.uses_teacher else None)
    student = model_from_state(config, student_state)
    calibrate_student(student, fitting, options)
    return student


def step0_errors(student, teacher, ids) -> dict[int, float]:
    captured = capture_mixer_io(teacher, ids, [0, 2])
    with torch.no_grad():
        outputs = student_mixer_outputs(student, {i: x for i, (x, _) in captured.items()})
    return {i: relative_error(outputs[i], y) for i, (_, y) in captured.items()}


def test_calibration_beats_the_zero_gate_against_the_teachers_attention(tiny_teacher):
    """On the calibration tokens: the least-squares output scale can only match or beat a skip (scale 0), and equals
    it only if the calibrated layer's output carries nothing of the teacher's; alignment then lowers the error."""
    fit = token_batch(0)
    zero = step0_errors(calibrated_student(tiny_teacher, InitOptions(), fit), tiny_teacher, fit)
    assert zero == {0: 1.0, 2: 1.0}  # the zero gate is an exact skip
    calibrated = step0_errors(calibrated_student(tiny_teacher, TEACHER_CALIBRATED, fit), tiny_teacher, fit)
    assert all(calibrated[i] < 0.99 for i in calibrated), calibrated  # 0.977 (GDN), 0.980 (Mamba2) measured
    aligned_options = InitOptions(gate="teacher", decay="teacher", beta="teacher", align_steps=5)
    aligned = step0_errors(calibrated_student(tiny_teacher, aligned_options, fit), tiny_teacher, fit)
    assert all(aligned[i] < calibrated[i] - 0.01 for i in calibrated), (aligned, calibrated)  # 0.931, 0.929


@requires_cuda
def test_calibration_on_cuda_fits_as_on_the_cpu(tiny_teacher):
    """The whole calibrated init (statistics, least-squares scales, alignment) with the teacher on the GPU: every
    tensor it makes lives on the teacher's device, and the step-0 errors match the CPU's (Triton kernels and TF32-free
    fp32 there, so to ~1e-4)."""
    options = InitOptions(gate="teacher", decay="teacher", beta="teacher", align_steps=2)
    fit = token_batch(0)
    on_cpu = step0_errors(calibrated_student(tiny_teacher, options, fit), tiny_teacher, fit)
    teacher = copy.deepcopy(tiny_teacher).cuda()
    student = calibrated_student(teacher, options, fit.cuda())
    assert {p.device.type for p in student.parameters()} == {"cuda"}
    on_gpu = step0_errors(student, teacher, fit.cuda())
    assert on_gpu == pytest.approx(on_cpu, abs=1e-3)


def test_same_seed_gives_byte_identical_weights(tiny_teacher):
    options = InitOptions(gate="teacher", decay="teacher", beta="teacher", align_steps=1)
    first, second = (save(calibrated_student(tiny_teacher, options, token_batch(0)).state_dict()) for _ in range(2))
    assert first == second


def test_a_folder_saved_before_b_bias_loads_with_beta_from_b_proj_alone(tmp_path):
    """b_bias defaults to 0 when a checkpoint lacks it, so b_t = sigmoid(W_b x_t) as before; nothing else moves."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from hybridize.convert.build import convert_model

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    convert_model(teacher, ["gated_deltanet", "full_attention"], options=InitOptions(decay="random")
                  ).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.0.mixer.b_bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[0].mixer.b_bias, torch.zeros(4))
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in state.items())
