"""Fitting converted Mamba2 / GDN mixers to the teacher's attention output on calibration text, after the init.

The memory branch of a window + memory layer is fitted the same way to what its window leaves over (the teacher's
attention output less the window's): the part of attention it exists to supply. Its memory_scale stays zero, so the
converted layer is still exactly its window; the fit decides where the branch starts once training opens it. The
recurrent heads of a head-wise layer are fitted alike, to what its attention heads leave over.

Two steps, both on a layer alone and teacher-forced (each mixer reads the teacher's captured attention input):
- output scale (gate "teacher"): the per-head factors s minimizing ||sum_h s_h f_h - y||^2, where f_h is head h's
  contribution through the output projection and y the teacher's attention output: a linear least squares in
  H unknowns, so the layer's error on the calibration tokens is at most that of a skip (s = 0);
- alignment (align_steps > 0): full-batch Adam on all of the mixer's parameters, loss ||mixer(x) - y||^2 / ||y||^2.
Both run in fp32 on a copy of the mixer and write back in the model's dtypes. Nothing is sampled, so the result is
a function of the inputs alone.
"""

import copy

import torch
from torch import nn

from ..model.configuration_hybrid import BRANCH_TYPES, RECURRENT_TYPES
from ..teacher_forcing import capture_mixer_io, teacher_forced_context
from .init import InitOptions
from .statistics import HeadStatistics, layer_statistics

ALIGN_LR = 1e-3
# Ridge on the scale fit, relative to the Gram matrix's mean diagonal: keeps heads with (nearly) collinear
# contributions from getting large opposite scales.
SCALE_RIDGE = 1e-4


def output_projection(mixer: nn.Module) -> nn.Linear:
    return mixer.o_proj if hasattr(mixer, "o_proj") else mixer.out_proj


def head_contributions(mixer: nn.Module, hidden: torch.Tensor, context) -> torch.Tensor:
    """Each head's share of the mixer output [N, H, C] (their sum over H is the output), in fp32."""
    projection = output_projection(mixer)
    captured = []
    handle = projection.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        mixer(hidden, context)
    finally:
        handle.remove()
    heads = mixer.num_heads
    inner = captured[0].reshape(-1, heads, projection.in_features // heads).float()  # [N, H, D]
    weight = projection.weight.float().view(projection.out_features, heads, -1)  # [C, H, D]
    return torch.einsum("nhd,chd->nhc", inner, weight)


def least_squares_head_scales(contributions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """s [H] minimizing ||sum_h s_h contributions[:, h] - target||^2 (contributions [N, H, C], target [N, C])."""
    gram = torch.einsum("nhc,nkc->hk", contributions, contributions).double()  # [H, H]
    rhs = torch.einsum("nhc,nc->h", contributions, target.float()).double()  # [H]
    ridge = SCALE_RIDGE * gram.diagonal().mean().clamp_min(1e-30)
    return torch.linalg.solve(gram + ridge * torch.eye(len(rhs), dtype=gram.dtype, device=gram.device), rhs).float()


@torch.no_grad()
def fit_output_scale(mixer: nn.Module, hidden: torch.Tensor, target: torch.Tensor, context) -> torch.Tensor:
    """Scales each head's columns of the output projection by its least-squares factor; returns the factors [H]."""
    scales = least_squares_head_scales(head_contributions(mixer, hidden, context), target.reshape(-1, target.shape[-1]))
    projection = output_projection(mixer)
    weight = projection.weight.view(projection.out_features, mixer.num_heads, -1)  # [C, H, D]
    weight.mul_(scales[None, :, None].to(weight.dtype))
    return scales


def align(mixer: nn.Module, hidden: torch.Tensor, target: torch.Tensor, context, steps: int) -> list[float]:
    """`steps` full-batch Adam steps of the mixer's parameters on the relative squared error; returns the losses."""
    optimizer = torch.optim.Adam(mixer.parameters(), lr=ALIGN_LR)
    norm = target.float().pow(2).sum()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = (mixer(hidden, context).float() - target.float()).pow(2).sum() / norm
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def calibrate_student(student: nn.Module, captured: dict[int, tuple[torch.Tensor, torch.Tensor]],
                      options: InitOptions) -> None:
    """Fits every Mamba2 / GDN mixer of `student` (and every window + memory or head-wise layer's recurrent branch, to
    the residual its attention branch leaves) to the teacher's attention {layer: (input, output)}, in place."""
    if options.gate != "teacher" and options.align_steps == 0:
        return
    for i, (hidden, target) in sorted(captured.items()):
        kind = student.config.layer_types[i]
        if kind not in RECURRENT_TYPES and kind not in BRANCH_TYPES:
            continue
        layer_mixer = student.model.layers[i].mixer
        original = layer_mixer.memory if kind in BRANCH_TYPES else layer_mixer
        mixer = copy.deepcopy(original).float()
        hidden, target = hidden.float(), target.float()
        context = teacher_forced_context(student, hidden)
        if kind in BRANCH_TYPES:
            with torch.no_grad():
                target = target - copy.deepcopy(layer_mixer.window).float()(hidden, context)
        if options.gate == "teacher":
            fit_output_scale(mixer, hidden, target, context)
        if options.align_steps:
            with torch.enable_grad():
                align(mixer.train(), hidden, target, context, options.align_steps)
        with torch.no_grad():
            for mine, theirs in zip(mixer.parameters(), original.parameters(), strict=True):
                theirs.copy_(mine)


@torch.no_grad()
def teacher_calibration(teacher: nn.Module, input_ids: torch.LongTensor, layers: list[int]
                        ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[int, HeadStatistics]]:
    """({layer: (attention input, output)}, {layer: HeadStatistics}) of the teacher on calibration text."""
    captured = capture_mixer_io(teacher, input_ids, layers)
    statistics = {}
    for i, (hidden, _) in captured.items():
        attention = {f"{name}.weight": getattr(teacher.model.layers[i].self_attn, name).weight
                     for name in ("q_proj", "k_proj")}
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        rope = teacher.model.rotary_emb(hidden, positions)
        statistics[i] = layer_statistics(attention, teacher.config, hidden, rope)
    return captured, statistics
