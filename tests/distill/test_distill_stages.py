"""Stages: what trains in each stage, lr groups by layer type, LoRA targets and merge, and the teacher kept out of the module."""

import pytest
import torch
from distill_support import TINY_LAYER_TYPES
from transformers import AutoModelForCausalLM

from hybridize.distill.export import load_student
from hybridize.losses import KDOptions
from hybridize.distill.recipe import AttentionOutputStage, KDStage, LoraConfig
from hybridize.distill.stages import (
    AttentionOutputDistiller, KDDistiller, add_lora, lora_target_modules, merge_lora, parameter_groups,
    prepare_student, trainable_names,
)
from hybridize.errors import UserError

GEOMETRY = dict(tokens=1000, seq_len=16, global_batch_size=2, micro_batch_size=1)


def stage1(**extra):
    return AttentionOutputStage(name="attention", kind="attention_output", lr=1e-3, **GEOMETRY, **extra)


def stage2(**extra):
    return KDStage(name="kd", kind="kd", lr=1e-4, **{**GEOMETRY, **extra})


@pytest.fixture
def student(tiny_models):
    return load_student(tiny_models / "init")


@pytest.fixture
def teacher(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models / "teacher").eval().requires_grad_(False)


def test_stage1_trains_exactly_the_mixers_of_replaced_layers(student):
    names = trainable_names(student, stage1())
    replaced = [i for i, kind in enumerate(TINY_LAYER_TYPES) if kind != "full_attention"]
    assert replaced == [0, 2, 3]  # sliding-window attention counts as replaced
    prefixes = tuple(f"model.layers.{i}.mixer." for i in replaced)
    assert names == {n for n, _ in student.named_parameters() if n.startswith(prefixes)}
    assert any("A_log" in n for n in names) and not any(".mlp." in n or "norm.weight" == n[-11:] for n in names)


def test_stage2_patterns_and_layer_type_prefixes(student):
    patterns = ["mamba2:model.layers.*.mixer.*", "*.post_attention_layernorm.*"]
    names = trainable_names(student, stage2(trainable=patterns))
    assert names == ({n for n, _ in student.named_parameters() if n.startswith("model.layers.2.mixer.")}
                     | {f"model.layers.{i}.post_attention_layernorm.weight" for i in range(4)})
    with pytest.raises(UserError, match=r"trainable\[0\] 'model\.layer\.\*' matches no parameter"):
        trainable_names(student, stage2(trainable=["model.layer.*"]))


def test_prepare_student_freezes_the_rest_and_groups_lrs_by_layer_type(student):
    stage = stage2(lr_by_layer_type={"gated_deltanet": 3e-4, "full_attention": 2e-5}, weight_decay=0.1)
    prepare_student(student, stage)
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in student.named_parameters() if n.startswith("model.layers.")}
    groups = parameter_groups(student, stage)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(student.named_parameters())
    assert lr_of[id(params["model.layers.0.mixer.A_log"])] == 3e-4
    assert lr_of[id(params["model.layers.1.mlp.up_proj.weight"])] == 2e-5
    assert lr_of[id(params["model.layers.2.mixer.x_proj.weight"])] == 1e-4  # mamba2: the stage's lr
    assert decay_of[id(params["model.layers.0.mixer.q_proj.weight"])] == 0.1
    assert decay_of[id(params["model.layers.0.mixer.A_log"])] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(trained)
    assert all(g["peak_lr"] == g["lr"] for g in groups)


def test_half_life_parameters_get_half_life_lr_and_move_by_it_in_the_first_adamw_step(student):
    """Adam's first step moves every parameter by lr * g / (|g| + eps), i.e. by its lr where |g| >> eps: the
    half-life parameters (A_log, dt_bias of GDN and Mamba2 layers) by half_life_lr, the rest by their layer's lr."""
    prepare_student(student, stage2(trainable=["model.layers.*"]))
    params = dict(student.named_parameters())
    half_life = [f"model.layers.{i}.mixer.{p}" for i in (0, 2) for p in ("A_log", "dt_bias")]
    plain_groups = parameter_groups(student, stage2(lr_by_layer_type={"mamba2": 2e-4}))
    groups = parameter_groups(student, stage2(lr_by_layer_type={"mamba2": 2e-4}, half_life_lr=1e-2))
    lr_of = lambda gs: {n: g["lr"] for g in gs for p in g["params"] for n in params if params[n] is p}
    assert [lr_of(plain_groups)[n] for n in half_life] == [1e-4, 1e-4, 2e-4, 2e-4]  # null: the layer's lr
    assert [lr_of(groups)[n] for n in half_life] == [1e-2] * 4
    # The same groups of the same parameters either way: a resumed run may change half_life_lr.
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in plain_groups]
    with torch.no_grad():  # the conversion holds new outputs at zero, so that gradients reach A_log and dt_bias
        for param in params.values():
            if not param.any():
                param.normal_(0, 0.1)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(groups, eps=1e-30)
    student(torch.randint(0, student.config.vocab_size, (2, 40)), labels=torch.randint(0, 100, (2, 40))).loss.backward()
    optimizer.step()
    for name in half_life + ["model.layers.2.mixer.D", "model.layers.0.mixer.b_bias"]:
        moved = (params[name] - before[name]).abs()
        assert (params[name].grad != 0).any(), name
        expected = lr_of(groups)[name]
        assert torch.allclose(moved[params[name].grad != 0], torch.tensor(expected), rtol=1e-3), (name, moved)


def test_lora_targets_kept_attention_and_mlps_not_trained_in_full():
    lora = LoraConfig()
    targets = lora_target_modules(TINY_LAYER_TYPES, lora, trained={"model.layers.3.mlp.up_proj.weight"})
    attention = [t for t in targets if ".mixer." in t]
    assert attention == [f"model.layers.1.mixer.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert len([t for t in targets if ".mlp." in t]) == 4 * 3 - 1 and "model.layers.3.mlp.up_proj" not in targets
    only_attention = lora_target_modules(TINY_LAYER_TYPES, LoraConfig(targets=["attention"]), trained=set())
    assert only_attention == attention


def test_lora_merge_equals_the_unmerged_forward(student, tiny_models):
    stage = stage2(trainable=["gated_deltanet:model.layers.*.mixer.*"], lora=LoraConfig(rank=4, alpha=8))
    adapted = prepare_student(student, stage)
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert {n for n in trained if ".lora_" in n}
    assert all(".lora_" in n or n.startswith("model.layers.0.mixer.") for n in trained)
    with torch.no_grad():  # LoRA's B starts at zero; give the adapters something to merge
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    input_ids = torch.randint(0, student.config.vocab_size, (2, 40))
    with torch.no_grad():
        unmerged = student(input_ids, use_cache=False).logits
        merged_model = merge_lora(adapted)
        merged = merged_model(input_ids, use_cache=False).logits
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    assert type(merged_model.model.layers[1].mixer.q_proj) is torch.nn.Linear
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        base = load_student(tiny_models / "init")(input_ids, use_cache=False).logits
    assert not torch.allclose(base, merged, atol=1e-4)  # the adapters did change the function


def test_lora_with_nothing_left_to_adapt_is_a_user_error(student):
    stage = stage2(trainable=["model.layers.*"], lora=LoraConfig())
    with pytest.raises(UserError, match="lora has nothing to adapt"):
        add_lora(student, stage, trainable_names(student, stage))


def test_teacher_is_not_part_of_the_distiller(student, teacher):
    for distiller in (AttentionOutputDistiller(student, teacher), KDDistiller(student, teacher, KDOptions())):
        assert all(k.startswith("student.") for k in distiller.state_dict())
        assert distiller.teacher is teacher
    assert AttentionOutputDistiller(student, teacher)._no_split_modules == [
        "Attention", "GatedDeltaNetMixer", "HybridDecoderLayer", "Mamba2Mixer"]
    assert KDDistiller(student, teacher, KDOptions())._no_split_modules == ["HybridDecoderLayer"]


def test_stage1_gradients_reach_only_replaced_mixers(student, teacher):
    prepare_student(student, stage1())
    distiller = AttentionOutputDistiller(student, teacher)
    loss, metrics = distiller(torch.randint(0, student.config.vocab_size, (2, 48)))
    loss.backward()
    assert set(metrics) == {"mse/layer_00", "mse/layer_02", "mse/layer_03"}
    assert loss.item() == pytest.approx(sum(v.item() for v in metrics.values()), rel=1e-6)
    assert all(v.item() > 0 for v in metrics.values())  # even the window-24 sliding layer differs at T = 48
    with_grad = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(n.split(".")[2] in {"0", "2", "3"} and ".mixer." in n for n in with_grad)
    assert all(p.grad is None for p in teacher.parameters())


def test_stage2_loss_is_the_kl_of_the_two_models(student, teacher):
    distiller = KDDistiller(student, teacher, KDOptions(chunk_tokens=7))
    input_ids = torch.randint(0, student.config.vocab_size, (2, 20))
    with torch.no_grad():
        loss, metrics = distiller(input_ids)
        s = torch.log_softmax(student(input_ids, use_cache=False).logits.double(), -1)
        t = torch.log_softmax(teacher(input_ids, use_cache=False).logits.double(), -1)
    expected = (t.exp() * (t - s)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["kl"].item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("recurrent_rope", [False, True])
def test_both_stages_train_under_bf16_autocast(teacher, recurrent_rope):
    """On a GPU the stages run with fp32 weights under bf16 autocast (mixed_precision: bf16). The same on the CPU:
    stage 1's mixers on the teacher's captured inputs and stage 2's whole model give finite losses near the fp32 ones
    and gradients to every replaced mixer, recurrent RoPE (fp32 cos and sin meeting bf16 q, k) included."""
    from hybridize.convert.build import convert_model

    student = convert_model(teacher, TINY_LAYER_TYPES, recurrent_rope=recurrent_rope)
    input_ids = torch.randint(0, student.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    for stage, distiller in ((stage1(), AttentionOutputDistiller(student, teacher)),
                             (stage2(), KDDistiller(student, teacher, KDOptions(chunk_tokens=32)))):
        prepare_student(student, stage)
        with torch.no_grad():
            expected, _ = distiller(input_ids)
        student.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = distiller(input_ids)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=0.05), stage.kind
        for i, kind in enumerate(TINY_LAYER_TYPES):
            if kind in ("gated_deltanet", "mamba2"):
                grads = [p.grad for p in student.model.layers[i].mixer.parameters() if p.requires_grad]
                assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), (stage.kind, kind)


def test_memory_branches_get_memory_lr_and_open_by_it_in_the_first_adamw_step():
    """memory_scale starts at zero, and Adam moves it by about its lr per step whatever its gradient's size: the
    recurrent branch of window + memory and head-wise layers (its mixer and memory_scale) takes memory_lr, the window
    and kept heads their layer's lr, the branch's half-life parameters half_life_lr where it is set."""
    from hybridize.model import HybridConfig, HybridForCausalLM

    torch.manual_seed(0)
    config = HybridConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                          gdn_chunk_size=16, mamba_chunk_size=16,
                          layer_types=["window_gated_deltanet", "full_attention", "headwise_mamba2"])
    student = HybridForCausalLM(config)
    with torch.no_grad():  # as conversion leaves them: each layer exactly its attention part
        for i in (0, 2):
            student.model.layers[i].mixer.memory_scale.zero_()
    params = dict(student.named_parameters())
    prepare_student(student, stage2(trainable=["model.layers.*"]))
    stage = stage2(lr_by_layer_type={"headwise_mamba2": 2e-4}, memory_lr=1e-2)
    groups, plain_groups = parameter_groups(student, stage), parameter_groups(student, stage2())
    lr_of = {n: g["lr"] for g in groups for p in g["params"] for n in params if params[n] is p}
    branch = {n for n in params if n.startswith(("model.layers.0.mixer.memory", "model.layers.2.mixer.memory"))}
    assert {"model.layers.0.mixer.memory_scale", "model.layers.2.mixer.memory.x_proj.weight"} <= branch
    assert all(lr_of[n] == 1e-2 for n in branch)
    assert lr_of["model.layers.0.mixer.window.q_proj.weight"] == 1e-4
    assert lr_of["model.layers.2.mixer.window.q_proj.weight"] == 2e-4
    assert lr_of["model.layers.1.mixer.q_proj.weight"] == lr_of["model.layers.0.mlp.up_proj.weight"] == 1e-4
    with_half_life = parameter_groups(student, stage2(memory_lr=1e-2, half_life_lr=3e-2))
    assert {g["lr"] for g in with_half_life for p in g["params"] if p is params["model.layers.0.mixer.memory.A_log"]} \
        == {3e-2}
    # The same groups of the same parameters whatever the lrs: a resumed run may change memory_lr.
    for other in (plain_groups, with_half_life):
        assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in other]
    optimizer = torch.optim.AdamW(groups, eps=1e-30)
    input_ids = torch.randint(0, 97, (2, 24))
    student(input_ids, labels=input_ids).loss.backward()
    assert params["model.layers.0.mixer.memory.q_proj.weight"].grad.abs().max() == 0  # closed: only the scale learns
    optimizer.step()
    for i in (0, 2):  # each scale was zero: after one step it is memory_lr away from it
        scale = params[f"model.layers.{i}.mixer.memory_scale"]
        assert (scale.grad != 0).all()
        assert torch.allclose(scale.abs(), torch.tensor(1e-2), rtol=1e-3)
