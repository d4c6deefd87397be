"""Teacher forcing for token mixers: what each teacher attention layer reads and writes, and the student's answer to it.

Conversion reports, layer scoring and distillation stage 1 all compare a student mixer with the teacher's
attention on the same input, so the capture lives here once.
"""

import torch
from torch import nn

from .model.context import SequenceContext


@torch.no_grad()
def capture_mixer_io(
    teacher: nn.Module, input_ids: torch.LongTensor, layers: list[int], attention_mask: torch.Tensor | None = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (input to self_attn [B, T, C], self_attn output [B, T, C])} from one teacher forward."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(index: int):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[index] = (hidden.detach(), output[0].detach())

        return hook

    handles = [
        teacher.model.layers[i].self_attn.register_forward_hook(hook_for(i), with_kwargs=True) for i in layers
    ]
    try:
        # Hooks inside compiled layers (distillation compiles them for KD) would be traced into their graphs.
        with torch.compiler.set_stance("force_eager"):
            teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def teacher_forced_context(student: nn.Module, hidden: torch.Tensor) -> SequenceContext:
    """The context of a plain full-sequence forward (no cache, no padding) for inputs shaped like `hidden`."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    return SequenceContext(
        position_embeddings=student.model.rotary_emb(hidden, positions), attention_mask=None, past_tokens=0
    )


def student_mixer_outputs(student: nn.Module, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """{layer: student mixer output [B, T, C]} for each teacher-captured mixer input; keeps the autograd graph."""
    if not inputs:
        return {}
    context = teacher_forced_context(student, next(iter(inputs.values())))
    return {i: student.model.layers[i].mixer(x, context) for i, x in inputs.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over all elements, in fp32."""
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()
