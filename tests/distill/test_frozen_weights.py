"""kd stages hold frozen linear weights in the autocast dtype where that is exact: the same loss and gradients."""

import math
import shutil

import pytest
import torch
from distill_support import TINY_LAYER_TYPES, metrics, tiny_recipe
from helpers import requires_cuda
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from hybridize.convert.build import convert_model
from hybridize.distill.export import load_student
from hybridize.distill.frozen_weights import frozen_weight_dtype, hold_frozen_linears
from hybridize.distill.recipe import AttentionOutputStage, KDStage, LoraConfig, OnPolicyStage, parse_recipe
from hybridize.distill.stages import KDDistiller, prepare_student
from hybridize.distill.trainer import Trainer
from hybridize.losses import KDOptions

GEOMETRY = dict(tokens=1000, seq_len=16, global_batch_size=2, micro_batch_size=1, lr=1e-4)
# The GDN mixer trains in full; LoRA on the kept attention layer and every MLP; the Mamba2 and window layers frozen.
KD = KDStage(name="kd", kind="kd", trainable=["gated_deltanet:model.layers.*.mixer.*"],
             lora=LoraConfig(rank=4, alpha=8), **GEOMETRY)


@pytest.fixture(scope="module", params=["tied", "untied"])
def teacher_bf16(tiny_models, request):
    """The tiny teacher in bf16, as the Hub stores a Llama; untied: its own output head (Llama-3.1-8B's layout)."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models / "teacher", dtype=torch.bfloat16)
    if request.param == "untied":
        teacher.config.tie_word_embeddings = False
        teacher.lm_head.weight = nn.Parameter(teacher.lm_head.weight.detach() * 2)
    return teacher.requires_grad_(False)


@pytest.fixture(scope="module")
def bf16_init(teacher_bf16, tmp_path_factory):
    """The teacher converted in its dtype and saved, as `convert` does: the student loads in fp32 with bf16 values."""
    folder = tmp_path_factory.mktemp("bf16") / "init"
    student = convert_model(teacher_bf16, TINY_LAYER_TYPES)
    assert student.config.tie_word_embeddings == teacher_bf16.config.tie_word_embeddings
    student.save_pretrained(folder)
    return folder


def kd_student(folder, held: bool) -> nn.Module:
    """The student of KD from `folder` (fp32, as training loads it), LoRA B made non-zero the same way each time."""
    student = load_student(folder)
    torch.manual_seed(0)
    prepare_student(student, KD)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    if held:
        hold_frozen_linears(student, torch.bfloat16)
    return student


def frozen_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]


def test_only_frozen_linears_change_dtype_and_a_tied_head_stays_with_the_embedding(bf16_init):
    reference = kd_student(bf16_init, held=False)
    student = load_student(bf16_init)
    torch.manual_seed(0)
    prepare_student(student, KD)
    fp32_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    cast = hold_frozen_linears(student, torch.bfloat16)
    tied = student.lm_head.weight is student.model.embed_tokens.weight
    assert student.lm_head.weight.dtype == (torch.float32 if tied else torch.bfloat16)  # tied: the residual stream
    frozen = frozen_linears(student)
    held = {name for name, m in student.named_modules() if m in frozen and not (tied and name == "lm_head")}
    assert all(student.get_submodule(name).weight.dtype == torch.bfloat16 for name in held)
    assert "model.layers.3.mlp.down_proj.base_layer" in held  # a LoRA base
    assert "model.layers.2.mixer.z_proj" in held  # a frozen replaced mixer's projection
    assert cast == sum(student.get_submodule(name).weight.numel() for name in held)
    assert sum(p.numel() * p.element_size() for p in student.parameters()) == fp32_bytes - 2 * cast
    for name, param in student.named_parameters():
        if param.requires_grad or "norm" in name or "embed" in name:
            assert param.dtype == reference.get_parameter(name).dtype, name
    assert all(p.dtype == torch.float32 for p in student.parameters() if p.requires_grad)


def test_held_weights_give_the_same_kd_loss_and_gradients_under_bf16_autocast(bf16_init, teacher_bf16):
    """Autocast casts a frozen fp32 weight to bf16 at every call; where the values are bf16's, that cast is exact, so
    the held student computes with the same operands: the loss and every trained gradient are equal, not close."""
    input_ids = torch.randint(0, teacher_bf16.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    results = {}
    for held in (False, True):
        student = kd_student(bf16_init, held)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = KDDistiller(student, teacher_bf16, KDOptions(chunk_tokens=32))(input_ids)
        loss.backward()
        results[held] = loss.detach(), {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    (loss_ref, grads_ref), (loss, grads) = results[False], results[True]
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and any(".lora_" in n for n in grads)
    for name, grad in grads.items():
        assert grad is not None and torch.equal(grad, grads_ref[name]), name


def test_the_exported_weights_are_the_fp32_ones(bf16_init):
    """Export loads the trained state into a fresh fp32 student: the held weights come back as the values they had."""
    reference, student = kd_student(bf16_init, held=False), kd_student(bf16_init, held=True)
    fresh = kd_student(bf16_init, held=False)
    fresh.load_state_dict(student.state_dict(), strict=True)
    for name, param in fresh.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, reference.get_parameter(name)), name


def test_weights_bf16_cannot_hold_stay_fp32(tiny_models):
    """An fp32 teacher's student (random fp32 values): what the teacher gave stays fp32; only frozen layers whose
    values bf16 holds exactly are cast (the Mamba2 mixer's zero-initialized projections, and a layer made exact)."""
    student = load_student(tiny_models / "init")
    prepare_student(student, KD)
    zeros = {f"{name}.weight" for name, m in student.named_modules()
             if isinstance(m, nn.Linear) and not m.weight.requires_grad and not m.weight.any()}
    assert zeros and all(".mixer." in name for name in zeros)
    cast = hold_frozen_linears(student, torch.bfloat16)
    assert {name for name, p in student.named_parameters() if p.dtype == torch.bfloat16} == zeros
    assert cast == sum(student.get_parameter(name).numel() for name in zeros)
    down = student.model.layers[2].mlp.down_proj.base_layer
    with torch.no_grad():
        down.weight.copy_(down.weight.bfloat16())
    assert hold_frozen_linears(student, torch.bfloat16) == down.weight.numel()
    assert down.weight.dtype == torch.bfloat16


def test_which_stages_hold_frozen_weights():
    on_policy = OnPolicyStage(name="op", kind="on_policy", prompt_tokens=8, new_tokens=8, **GEOMETRY)
    attention = AttentionOutputStage(name="attention", kind="attention_output", **GEOMETRY)
    assert frozen_weight_dtype(KD, "bf16", sharded=False) is torch.bfloat16
    assert frozen_weight_dtype(KD, "no", sharded=False) is None  # fp32 training: nothing is cast per call
    assert frozen_weight_dtype(KD, "bf16", sharded=True) is None  # FSDP2 gathers a layer's weights as one group
    assert frozen_weight_dtype(on_policy, "bf16", sharded=False) is None  # its student generates outside autocast
    assert frozen_weight_dtype(attention, "bf16", sharded=False) is None


@requires_cuda
def test_a_kd_stage_on_cuda_holds_them_and_exports_the_weights_unchanged(tmp_path, bf16_init, teacher_bf16, tokenizer,
                                                                         text_file, capfd):
    """The trainer's kd stage on a GPU (bf16 autocast): it says what it holds, trains to finite losses, and the frozen
    layers it held come out of the export with the values they went in with."""
    root = tmp_path / "models"
    teacher_bf16.save_pretrained(root / "teacher")
    shutil.copytree(bf16_init, root / "init")
    for folder in ("teacher", "init"):
        tokenizer.save_pretrained(root / folder)
    out = tmp_path / "run"
    recipe = tiny_recipe(root, text_file, out, {"stages.1.trainable": KD.trainable,
                                                "stages.1.lora": {"rank": 4, "alpha": 8}})
    recipe["stages"] = recipe["stages"][1:]  # kd alone: the Mamba2 and window layers stay as converted
    final = Trainer(parse_recipe(recipe)).run()
    assert "frozen linear weights held in bf16" in capfd.readouterr().out
    losses = [row["loss"] for row in metrics(out) if row["split"] == "train"]
    assert losses and all(math.isfinite(loss) for loss in losses)
    before, after = load_file(root / "init" / "model.safetensors"), load_file(final / "model.safetensors")
    frozen = [key for key in before if key.startswith(("model.layers.2.mixer.", "model.layers.3.mixer."))]
    assert frozen and all(torch.equal(after[key].float(), before[key].float()) for key in frozen)
