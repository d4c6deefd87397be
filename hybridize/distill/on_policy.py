"""The on_policy stage: the student continues prompts cut from the training text, the teacher scores the result.

A step is on-policy with probability `on_policy_fraction`, else teacher-forced (KD on the training blocks with the
same divergence). On an on-policy step every sequence of the global batch is a block's first prompt_tokens,
continued by the student for new_tokens with its own cached decode; the teacher scores prompt + continuation in
one forward, and the divergence is taken on the rows that predict the student's tokens only. With `generator:
teacher` the teacher continues the prompts instead (sequence-level KD), and the loss covers the teacher's tokens.

Randomness holds no state: whether step s generates, and the uniforms that draw sequence k's tokens, are fixed by
(seed, stage, s) and (seed, stage, stream position of k). A resumed run, a run on more processes and a run that
never stopped draw the same numbers, and progress.json's step is the whole of the sampler's state.
"""

import hashlib
import time
from contextlib import contextmanager

import torch
from torch import nn

from ..model.fast_decode import StaticDecoder
from ..model.sampling import Sampling, choose_tokens
from .data import StageData
from .recipe import OnPolicyStage


def _seed(*parts: int) -> int:
    """A 63-bit generator seed from integers; distinct tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_STEP_KIND, _SEQUENCE = 0, 1  # which stream a seed is for


def step_generates(seed: int, stage_index: int, step: int, fraction: float) -> bool:
    """Whether optimizer step `step` of the stage is on-policy: a draw below `fraction` (0 and 1 draw nothing)."""
    if fraction >= 1 or fraction <= 0:
        return fraction >= 1
    generator = torch.Generator().manual_seed(_seed(_STEP_KIND, seed, stage_index, step))
    return torch.rand((), generator=generator).item() < fraction


def sampling_uniforms(seed: int, stage_index: int, first_position: int, count: int, new_tokens: int) -> torch.Tensor:
    """[count, new_tokens] uniforms in [0, 1) for the sequences at stream positions first_position, ... (one row each)."""
    rows = [torch.rand(new_tokens, generator=torch.Generator().manual_seed(_seed(_SEQUENCE, seed, stage_index, k)))
            for k in range(first_position, first_position + count)]
    return torch.stack(rows)


def generated_loss_mask(sequences: torch.LongTensor, prompt_tokens: int, eos: int | None) -> torch.Tensor:
    """[B, T] bool: the rows whose next token the student generated, up to and including its first eos.

    Row r holds the distribution over token r + 1, so the first loss row is prompt_tokens - 1 and the last row
    (which predicts nothing here) never carries loss. Tokens after a continuation's first eos are padding.
    """
    columns = torch.arange(sequences.shape[1], device=sequences.device)
    generated = (columns >= prompt_tokens)[None].expand_as(sequences)  # [B, T]
    is_eos = generated & (sequences == eos) if eos is not None else torch.zeros_like(generated)
    ended = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # [B, T]: an earlier generated token was eos
    kept = generated & ~ended  # [B, T] real generated tokens
    mask = torch.zeros_like(kept)
    mask[:, :-1] = kept[:, 1:]
    return mask


@contextmanager
def eval_mode(module: nn.Module):
    """Dropout (LoRA's) off while generating; the module's own mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def cached_continuations(model: nn.Module, prompts: torch.LongTensor, uniforms: torch.Tensor,
                         sampling: Sampling) -> torch.LongTensor:
    """prompts [B, P] -> [B, P + L]: L tokens chosen with uniforms [B, L], through the model's own cache (HybridCache)."""
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    tokens = [choose_tokens(out.logits[:, -1], uniforms[:, 0], sampling)]  # [B, 1] each
    for j in range(1, uniforms.shape[1]):
        out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(choose_tokens(out.logits[:, -1], uniforms[:, j], sampling))
    return torch.cat([prompts, *tokens], dim=1)


class ContinuationSampler:
    """The student's continuations: the static decoder (one graph per step on a GPU) where the student's weights
    are plain tensors, else (FSDP2 shards them, gathered per forward) the model's own cache loop."""

    def __init__(self, student: nn.Module, stage: OnPolicyStage, static: bool):
        self.student, self.static = student, static
        self.sampling = Sampling(temperature=stage.sample_temperature, top_k=stage.top_k, top_p=stage.top_p)
        self.new_tokens, self.length = stage.new_tokens, stage.seq_len
        self._decoder: StaticDecoder | None = None

    def __call__(self, prompts: torch.LongTensor, uniforms: torch.Tensor) -> torch.LongTensor:
        # The student's own fp32 weights, not the training forward's bf16 autocast: the static caches hold one dtype.
        with eval_mode(self.student), torch.autocast(prompts.device.type, enabled=False):
            if not self.static:
                return cached_continuations(self.student, prompts, uniforms, self.sampling)
            if self._decoder is None or self._decoder.batch_size != prompts.shape[0]:
                # Built once per batch size: its buffers and (on a GPU) its captured step are reused every step,
                # and read the weights in place, so each step decodes with the weights the optimizer left.
                self._decoder = StaticDecoder(self.student, prompts.shape[0], self.length, sampling=self.sampling)
            return self._decoder.generate(prompts, self.new_tokens, uniforms=uniforms.to(prompts.device))


class TeacherContinuations:
    """The teacher's continuations (`generator: teacher`): the teacher's own cache loop, in its own weights; the
    student plays no part in what is generated."""

    def __init__(self, teacher: nn.Module, stage: OnPolicyStage):
        self.teacher = teacher
        self.sampling = Sampling(temperature=stage.sample_temperature, top_k=stage.top_k, top_p=stage.top_p)

    def __call__(self, prompts: torch.LongTensor, uniforms: torch.Tensor) -> torch.LongTensor:
        # The trainer compiles the teacher's decoder layers for its scoring forwards. Through them, the cache loop
        # would be traced again for each layer index and cache length until dynamo's recompile limit (generation
        # was 95% of each step's time on an H100), so it runs them eager.
        with torch.compiler.set_stance("force_eager"):
            return cached_continuations(self.teacher, prompts, uniforms.to(prompts.device), self.sampling)


class OnPolicyFeed:
    """What an on_policy stage's step feeds the model: for on-policy steps the generated sequences and their loss mask,
    for teacher-forced steps the training blocks; and the step's generation time."""

    def __init__(self, stage: OnPolicyStage, stage_index: int, seed: int, eos: int | None, world: int):
        self.stage, self.stage_index, self.seed, self.eos, self.world = stage, stage_index, seed, eos, world
        self.generation_seconds = 0.0

    def inputs(self, model: nn.Module, step: int, micro: int, rank: int, blocks: torch.LongTensor) -> dict:
        """The keyword arguments of the model's training forward for micro batch `micro` of `step` (blocks [B, T])."""
        stage = self.stage
        if not step_generates(self.seed, self.stage_index, step, stage.on_policy_fraction):
            return {"input_ids": blocks}
        first = StageData.stream_start(step, micro, stage.micro_batch_size, stage.global_batch_size, rank, self.world)
        uniforms = sampling_uniforms(self.seed, self.stage_index, first, blocks.shape[0], stage.new_tokens)
        started = time.perf_counter()
        with torch.no_grad():
            sequences = model(blocks[:, : stage.prompt_tokens], sample_uniforms=uniforms.to(blocks.device))
        if sequences.is_cuda:
            torch.cuda.synchronize(sequences.device)  # the decode is queued work until here
        self.generation_seconds += time.perf_counter() - started
        return {"input_ids": sequences, "loss_mask": generated_loss_mask(sequences, stage.prompt_tokens, self.eos)}

    def step_metrics(self, step: int, step_seconds: float) -> dict:
        """on_policy (1 or 0), generation_share of the step's time and generated_tokens_per_s (all processes' new
        tokens over this process's decode time); resets the step's generation time."""
        generated = step_generates(self.seed, self.stage_index, step, self.stage.on_policy_fraction)
        row = {"on_policy": float(generated), "generation_share": self.generation_seconds / step_seconds}
        if generated and self.generation_seconds > 0:
            tokens = self.stage.global_batch_size * self.stage.new_tokens
            row["generated_tokens_per_s"] = tokens / self.generation_seconds
        self.generation_seconds = 0.0
        return row
