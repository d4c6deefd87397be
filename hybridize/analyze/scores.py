"""Measured layer scores: every candidate mixer fitted layer-locally (the stage-1 loss), then the model-level KL and
perplexity change of the teacher with only that one layer replaced.

Sharing, so that scoring costs minutes: each fit step runs the teacher once and feeds every layer's captured
attention input to the candidates of every mixer type (all independent, so one AdamW over the sum of their
losses equals separate fits: no clipping or other step that would couple them). The model-level score of
"only layer i replaced" starts from the teacher's residual stream entering layer i, captured once, and runs
only layers i..L-1.
"""

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..convert.build import convert_model
from ..corpus import DOMAINS, token_blocks
from ..losses import attention_output_loss, kd_loss, next_token_labels
from ..teacher_forcing import capture_mixer_io, relative_error, teacher_forced_context


@dataclass(frozen=True)
class FitSettings:
    """The layer-local fit: `steps` AdamW steps of `batch_blocks` training blocks each, constant `lr`."""

    steps: int = 100
    batch_blocks: int = 2
    lr: float = 3e-3


@dataclass
class HeldOut:
    """What the teacher did on the held-out blocks, kept once for every model-level score."""

    layer_inputs: list[torch.Tensor]  # per layer: the residual stream entering it [B, T, C]
    final_hidden: torch.Tensor  # [B, T, C], after the final norm
    labels: torch.LongTensor  # [B * T], next tokens (ignored at the last position)
    teacher_nll: float


def training_blocks(tokenizer, seq_len: int, count: int) -> torch.LongTensor:
    """[count, seq_len] blocks of the train split, domains interleaved, so each fit step sees every domain."""
    per_domain = -(-count // len(DOMAINS))
    blocks = torch.stack([token_blocks(tokenizer, d, "train", seq_len, per_domain) for d in DOMAINS], dim=1)
    return blocks.flatten(0, 1)[:count]  # [count, T]


def autocast_to(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the fitted mixers (fp32 weights); a no-op in fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def capture_held_out(teacher, input_ids: torch.LongTensor) -> HeldOut:
    outputs = teacher.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    num_layers = teacher.config.num_hidden_layers
    labels = next_token_labels(input_ids).flatten()
    final = outputs.last_hidden_state  # [B, T, C]
    head = teacher.lm_head.weight
    nll = kd_loss(final.flatten(0, 1), head, final.flatten(0, 1), head, labels).ce.item()
    return HeldOut(list(outputs.hidden_states[:num_layers]), final, labels, nll)


def candidate_mixers(teacher, kind: str, seed: int, sink_tokens: int = 0, recurrent_rope: bool = False
                     ) -> nn.ModuleList:
    """Every layer's mixer of type `kind`, initialized from its attention exactly as `hybridize convert --sink-tokens
    sink_tokens [--recurrent-rope]` does; fp32."""
    hybrid = convert_model(teacher, [kind] * teacher.config.num_hidden_layers, seed=seed, sink_tokens=sink_tokens,
                           recurrent_rope=recurrent_rope)
    device = teacher.model.embed_tokens.weight.device
    return nn.ModuleList(layer.mixer for layer in hybrid.model.layers).to(device=device, dtype=torch.float32)


def fit_candidates(
    teacher, base, candidates: dict[str, nn.ModuleList], blocks: torch.LongTensor, settings: FitSettings,
    dtype: torch.dtype, progress=None,
) -> dict[str, list[float]]:
    """Fit every candidate in place on `blocks`; returns {kind: per-layer stage-1 MSE of the last step}."""
    layers = list(range(teacher.config.num_hidden_layers))
    device = teacher.model.embed_tokens.weight.device
    optimizers = {kind: torch.optim.AdamW(mixers.parameters(), lr=settings.lr, weight_decay=0.0)
                  for kind, mixers in candidates.items()}
    last: dict[str, list[float]] = {}
    for mixers in candidates.values():
        mixers.train()
    for step in range(settings.steps):
        ids = blocks[step * settings.batch_blocks:(step + 1) * settings.batch_blocks].to(device)  # [b, T]
        captured = capture_mixer_io(teacher, ids, layers)
        targets = {i: y for i, (_, y) in captured.items()}
        context = teacher_forced_context(base, captured[0][0])
        for kind, mixers in candidates.items():
            with autocast_to(device, dtype):
                outputs = {i: mixers[i](x, context) for i, (x, _) in captured.items()}
            loss, per_layer = attention_output_loss(outputs, targets)
            optimizers[kind].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[kind].step()
            if step == settings.steps - 1:  # .item() waits for the GPU: only once, at the end
                last[kind] = [per_layer[i].item() for i in layers]
        if progress is not None:
            progress.update(1)
    for mixers in candidates.values():
        mixers.eval().requires_grad_(False)
    return last


@contextmanager
def swapped_mixers(base, swaps: dict[int, nn.Module]):
    """`base` with the mixers of some layers replaced, put back afterwards."""
    layers = base.model.layers
    originals = {i: layers[i].mixer for i in swaps}
    for i, mixer in swaps.items():
        layers[i].mixer = mixer
    try:
        yield base
    finally:
        for i, mixer in originals.items():
            layers[i].mixer = mixer


@torch.no_grad()
def model_level(base, held_out: HeldOut, swaps: dict[int, nn.Module], dtype: torch.dtype) -> tuple[float, float]:
    """(KL(teacher || model) in nats/token, perplexity ratio model/teacher) of `base` with `swaps`.

    Layers before the first swapped one are the teacher's, so the run starts from `held_out`'s residual stream there.
    """
    start = min(swaps, default=0)  # with no swaps: the whole model, which must reproduce the teacher
    hidden = held_out.layer_inputs[start]  # [B, T, C]
    context = teacher_forced_context(base, hidden)
    with swapped_mixers(base, swaps), autocast_to(hidden.device, dtype):
        for layer in base.model.layers[start:]:
            hidden = layer(hidden, context)
        hidden = base.model.norm(hidden)  # [B, T, C]
    head = base.lm_head.weight
    terms = kd_loss(hidden.flatten(0, 1).to(head.dtype), head, held_out.final_hidden.flatten(0, 1), head,
                    held_out.labels)
    return terms.kl.item(), math.exp(terms.ce.item() - held_out.teacher_nll)


@torch.no_grad()
def layer_scores(
    base, held_out: HeldOut, candidates: dict[str, nn.ModuleList], dtype: torch.dtype, progress=None
) -> dict[str, dict[str, list[float]]]:
    """{kind: {"kl", "ppl_ratio", "rel_error": one value per layer}} with only that layer replaced by the candidate.

    rel_error is the candidate's held-out error against the teacher's attention output on the same input.
    """
    scores = {kind: {"kl": [], "ppl_ratio": [], "rel_error": []} for kind in candidates}
    for i, layer in enumerate(base.model.layers):
        x = layer.input_layernorm(held_out.layer_inputs[i])  # [B, T, C]
        context = teacher_forced_context(base, x)
        target = layer.mixer(x, context)  # the teacher's attention output
        for kind, mixers in candidates.items():
            with autocast_to(x.device, dtype):
                error = relative_error(mixers[i](x, context), target)
            kl, ppl_ratio = model_level(base, held_out, {i: mixers[i]}, dtype)
            for name, value in (("kl", kl), ("ppl_ratio", ppl_ratio), ("rel_error", error)):
                scores[kind][name].append(value)
            if progress is not None:
                progress.update(1)
    return scores
