"""Quality side by side on held-out text: perplexity per domain, KL(teacher||student), top-1 and greedy agreement.

Every number is taken on the same token blocks for both models in one pass over them:
- perplexity: exp(mean next-token NLL) over each domain's held-out blocks (code, docs, prose);
- KL(teacher||student): the mean over positions of sum_v p_t(v) (log p_t(v) - log p_s(v)), in nats;
- top-1 agreement: the share of positions where both models' most likely next token is the same;
- greedy agreement: prompts cut from the same blocks, continued greedily for 32 tokens by each model;
  the share of continuations identical to the teacher's (with its 95% Wilson interval: at 48 continuations a share
  of 0.3 is known to about +-0.13), and the mean length of the matching prefix.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..corpus import DOMAINS, token_blocks
from .common import format_table


@dataclass
class QualitySettings:
    seq_len: int = 2048  # past the 512-token sliding window: at 512 a window layer is exact attention (docs/evaluate.md)
    blocks_per_domain: int = 4
    batch_size: int = 4
    greedy_prompts: int = 16  # per domain
    greedy_prompt_len: int = 64
    greedy_new_tokens: int = 32
    domains: tuple[str, ...] = DOMAINS

    @classmethod
    def small(cls) -> "QualitySettings":
        """A CPU-sized run: a few short blocks per domain, still 32-token continuations."""
        return cls(seq_len=128, blocks_per_domain=2, batch_size=2, greedy_prompts=2, greedy_prompt_len=32)


@torch.no_grad()
def logit_stats(student, teacher, blocks: torch.LongTensor, batch_size: int) -> dict:
    """Sums over `blocks` [N, T]: NLL of each model, KL(teacher||student), top-1 matches, and the counts."""
    device = next(student.parameters()).device
    sums = {"student_nll": 0.0, "teacher_nll": 0.0, "kl": 0.0, "top1": 0, "predicted": 0, "positions": 0}
    for batch in blocks.split(batch_size):
        batch = batch.to(device)
        targets = batch[:, 1:].flatten()
        s_logp = F.log_softmax(student(input_ids=batch, use_cache=False).logits.float(), -1)  # [B, T, V]
        sums["student_nll"] += F.nll_loss(s_logp[:, :-1].flatten(0, 1), targets, reduction="sum").item()
        sums["predicted"] += targets.numel()
        sums["positions"] += batch.numel()
        if teacher is None:
            continue
        t_logp = F.log_softmax(teacher(input_ids=batch, use_cache=False).logits.float(), -1)  # [B, T, V]
        sums["teacher_nll"] += F.nll_loss(t_logp[:, :-1].flatten(0, 1), targets, reduction="sum").item()
        sums["kl"] += F.kl_div(s_logp, t_logp, log_target=True, reduction="sum").item()
        sums["top1"] += (s_logp.argmax(-1) == t_logp.argmax(-1)).sum().item()
    return sums


@torch.no_grad()
def greedy_continuations(model, prompts: torch.LongTensor, new_tokens: int, batch_size: int, pad_token_id: int):
    """[N, P] prompts -> [N, new_tokens] greedy tokens from `generate()`, never stopping at eos."""
    device = next(model.parameters()).device
    outputs = []
    for batch in prompts.split(batch_size):
        batch = batch.to(device)
        out = model.generate(
            input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=pad_token_id,
        )
        outputs.append(out[:, batch.shape[1]:].cpu())
    return torch.cat(outputs)


def continuation_agreement(student_tokens: torch.LongTensor, teacher_tokens: torch.LongTensor) -> tuple[int, int]:
    """(continuations identical to the teacher's, summed length of the matching prefixes) for [N, L] token ids."""
    same = (student_tokens == teacher_tokens).long()  # [N, L]
    prefix = same.cumprod(-1).sum(-1)  # [N]
    return int((prefix == same.shape[1]).sum()), int(prefix.sum())


def domain_quality(student, teacher, tokenizer, domain: str, settings: QualitySettings, log=print) -> dict:
    """Every quality number for one held-out domain; `log` gets a line as each step starts (CPU steps take minutes)."""
    blocks = token_blocks(tokenizer, domain, "heldout", settings.seq_len, settings.blocks_per_domain)
    log(f"quality {domain}: next-token statistics on {blocks.shape[0]} x {blocks.shape[1]} tokens")
    sums = logit_stats(student, teacher, blocks, settings.batch_size)
    result = {"tokens": sums["predicted"], "student_ppl": _ppl(sums["student_nll"], sums["predicted"]), "sums": sums}
    if teacher is None:
        return result
    # Prompts are short blocks of their own: cutting them from the long blocks would need 16 x 2048 held-out tokens.
    prompts = token_blocks(tokenizer, domain, "heldout", settings.greedy_prompt_len, settings.greedy_prompts)
    pad = tokenizer.pad_token_id
    log(f"quality {domain}: greedy continuations, {len(prompts)} x {settings.greedy_new_tokens} tokens, hybrid then "
        "teacher")
    s_cont = greedy_continuations(student, prompts, settings.greedy_new_tokens, settings.batch_size, pad)
    t_cont = greedy_continuations(teacher, prompts, settings.greedy_new_tokens, settings.batch_size, pad)
    exact, prefix = continuation_agreement(s_cont, t_cont)
    sums.update(greedy_exact=exact, greedy_prefix=prefix, greedy_count=len(prompts))
    result.update(_agreement(sums))
    return result


def _ppl(nll: float, count: int) -> float:
    return float(torch.tensor(nll / count).exp())


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% at the default z) of the share successes / trials: unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 or at every trial."""
    share, z2 = successes / trials, z * z / trials
    centre = (share + z2 / 2) / (1 + z2)
    half = z / (1 + z2) * math.sqrt(share * (1 - share) / trials + z2 / (4 * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def _agreement(sums: dict) -> dict:
    return {
        "teacher_ppl": _ppl(sums["teacher_nll"], sums["predicted"]),
        "kl": sums["kl"] / sums["positions"],
        "top1": sums["top1"] / sums["positions"],
        "greedy_exact": sums["greedy_exact"] / sums["greedy_count"],
        "greedy_exact_interval": list(wilson_interval(sums["greedy_exact"], sums["greedy_count"])),
        "greedy_count": sums["greedy_count"],
        "greedy_prefix": sums["greedy_prefix"] / sums["greedy_count"],
    }


def run_quality(student, teacher, tokenizer, settings: QualitySettings, log=print) -> dict:
    """{"settings", "domains": {domain: numbers}, "all": numbers pooled over every domain's tokens}."""
    domains = {d: domain_quality(student, teacher, tokenizer, d, settings, log) for d in settings.domains}
    pooled = {key: sum(r["sums"].get(key, 0) for r in domains.values()) for key in domains[settings.domains[0]]["sums"]}
    overall = {"tokens": pooled["predicted"], "student_ppl": _ppl(pooled["student_nll"], pooled["predicted"])}
    if teacher is not None:
        overall.update(_agreement(pooled))
    for result in domains.values():
        del result["sums"]
    return {"settings": asdict(settings), "domains": domains, "all": overall}


def quality_table(results: dict) -> str:
    rows = []
    for name, r in [*results["domains"].items(), ("all", results["all"])]:
        ratio = r["student_ppl"] / r["teacher_ppl"] if "teacher_ppl" in r else None
        rows.append([name, r["student_ppl"], r.get("teacher_ppl"), ratio, r.get("kl"), r.get("top1"),
                     r.get("greedy_exact"), r.get("greedy_prefix")])
    new = results["settings"]["greedy_new_tokens"]
    header = ["domain", "ppl hybrid", "ppl teacher", "ppl ratio", "KL(t||s)", "top-1 agree",
              f"greedy{new} exact", "matched prefix"]
    table = format_table(header, rows)
    overall = results["all"]
    if "greedy_exact_interval" not in overall:  # the hybrid alone: no agreement to bound
        return table
    low, high = overall["greedy_exact_interval"]
    return f"{table}\ngreedy{new} exact over {overall['greedy_count']} continuations: 95% interval {low:.3f}-{high:.3f}"


def compare(student, teacher, tokenizer, *, small: bool = True, settings: QualitySettings | None = None, log=print):
    """(results dict, printable table) for the student against the teacher (None: the student alone)."""
    settings = settings or (QualitySettings.small() if small else QualitySettings())
    results = run_quality(student, teacher, tokenizer, settings, log)
    return results, quality_table(results)
