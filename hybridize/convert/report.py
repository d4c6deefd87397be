"""The conversion report: per-layer step-0 error against the teacher's attention, model-level KL and perplexity ratio."""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..model.configuration_hybrid import HEADWISE_TYPES, WINDOW_MEMORY_TYPES
from ..teacher_forcing import relative_error, student_mixer_outputs


@torch.no_grad()
def next_token_stats(logits: torch.Tensor, input_ids: torch.LongTensor) -> tuple[torch.Tensor, float]:
    """(log-probs [B, T-1, V] in fp32, mean next-token cross-entropy)."""
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logprobs.gather(-1, input_ids[:, 1:, None]).mean().item()
    return logprobs, nll


def model_stats(student, input_ids: torch.LongTensor, teacher_logprobs: torch.Tensor, teacher_nll: float) -> dict:
    logprobs, nll = next_token_stats(student(input_ids=input_ids, use_cache=False).logits, input_ids)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - logprobs)).sum(-1).mean().item()
    return {
        "kl_teacher_hybrid": kl,
        "hybrid_ppl": float(torch.tensor(nll).exp()),
        "ppl_ratio": float(torch.tensor(nll - teacher_nll).exp()),
    }


@contextmanager
def recurrent_mixers_skipped(student):
    """Every Mamba2 / GDN mixer outputs exactly 0: the model the zero-gate init (silu(0) = 0) gives."""
    handles = [layer.mixer.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
               for layer, kind in zip(student.model.layers, student.config.layer_types) if kind in RECURRENT]
    try:
        yield student
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def conversion_report(
    student, captured: dict[int, tuple[torch.Tensor, torch.Tensor]], input_ids: torch.LongTensor,
    teacher_logprobs: torch.Tensor, teacher_nll: float, *, compare_zero_gate: bool = False,
) -> dict:
    """Step-0 numbers for a converted model, measured on the teacher's calibration batch; with compare_zero_gate,
    also the model-level numbers the zero-gate init would have given (under "zero_gate_init")."""
    outputs = student_mixer_outputs(student, {i: x for i, (x, _) in captured.items()})
    layers = [
        {"layer": i, "type": student.config.layer_types[i], "relative_error": relative_error(outputs[i], y)}
        for i, (_, y) in sorted(captured.items())
    ]
    report = {
        "calibration_tokens": input_ids.numel(),
        "layers": layers,
        "teacher_ppl": float(torch.tensor(teacher_nll).exp()),
        **model_stats(student, input_ids, teacher_logprobs, teacher_nll),
    }
    if compare_zero_gate and any(row["type"] in RECURRENT for row in layers):
        with recurrent_mixers_skipped(student):
            report["zero_gate_init"] = model_stats(student, input_ids, teacher_logprobs, teacher_nll)
    return report


RECURRENT = ("mamba2", "gated_deltanet")
LEGEND = ("rel. error = |layer output - teacher attention output| / |teacher attention output| on the calibration "
          "tokens,\n  each layer fed the teacher's input: 0 = the teacher's attention exactly, 1 = the layer adds "
          "nothing (as if\n  skipped), above 1 = worse than skipping.")
RECURRENT_NOTE = ("  Mamba2 / Gated DeltaNet layers read 1.0000 when their output gate starts at zero (the default): "
                  "they\n  output exactly 0, so the model starts as the teacher without those attention layers and "
                  "distillation\n  opens the gates. With another --init-gate, the zero-gate init's KL and perplexity "
                  "follow the\n  chosen init's.")
WINDOW_MEMORY_NOTE = ("  window + memory layers (window_gated_deltanet, window_mamba2) start as exactly their sliding "
                      "window: the\n  memory branch's output scale is 0 until distillation opens it, so they read "
                      "what sliding_attention would.")
HEADWISE_NOTE = (f"  head-wise layers ({', '.join(HEADWISE_TYPES)}) start as the teacher's attention without "
                 "their\n  recurrent heads: those heads' output scale is 0 until distillation opens it, so they read "
                 "the error of\n  dropping the replaced heads' share of the output.")


def format_report(report: dict) -> str:
    lines = ["layer  type               step-0 rel. error vs teacher attention"]
    lines += [f"{row['layer']:>5}  {row['type']:<18} {row['relative_error']:.4f}" for row in report["layers"]]
    if not report["layers"]:
        lines.append("  (no layer replaced)")
    else:
        lines.append(LEGEND)
    if any(row["type"] in RECURRENT for row in report["layers"]):
        lines.append(RECURRENT_NOTE)
    if any(row["type"] in WINDOW_MEMORY_TYPES for row in report["layers"]):
        lines.append(WINDOW_MEMORY_NOTE)
    if any(row["type"] in HEADWISE_TYPES for row in report["layers"]):
        lines.append(HEADWISE_NOTE)
    lines.append(
        f"KL(teacher||hybrid) {report['kl_teacher_hybrid']:.4f} nats/token   ppl {report['hybrid_ppl']:.2f} vs teacher "
        f"{report['teacher_ppl']:.2f} (ratio {report['ppl_ratio']:.3f}) on {report['calibration_tokens']} held-out tokens"
    )
    if baseline := report.get("zero_gate_init"):
        lines.append(
            f"  zero-gate init (Mamba2 / GDN layers skipped): KL {baseline['kl_teacher_hybrid']:.4f}   "
            f"ppl {baseline['hybrid_ppl']:.2f} (ratio {baseline['ppl_ratio']:.3f})"
        )
    return "\n".join(lines)
