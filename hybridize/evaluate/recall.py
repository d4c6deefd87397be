"""Recall suite: passkey / needle-in-a-haystack scored by generation, and multi-query associative recall (MQAR).

Passkey: held-out prose is the haystack; a sentence tying a random 7-digit number to a name is put at
a sentence boundary at each depth (0% = the start, 100% = just before the question), and the prompt
is cut to exactly each context length, so one length's prompts batch without padding. The model
continues "... The secret number of NAME is" greedily; a trial passes when the first 7 digits it writes
are the number. The prompt is plain text, the format the embedded instruct teacher passes at short lengths.

MQAR: word pairs "key: value," from natural single-token words of held-out prose, then the same keys
again in a new order; the score is top-1 accuracy of each value token given its key (one teacher-forced
forward, no generation). The text is built token by token and equals the tokenizer's own encoding.
"""

import random
import re
from dataclasses import asdict, dataclass

import torch

from ..corpus import documents
from .common import format_table
from .quality import greedy_continuations

NAMES = ("Alice", "Bruno", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Irene", "Jonas", "Keiko", "Liam",
         "Maria", "Nadia", "Oscar", "Priya")
QUESTION = "\n\nWhat is the secret number of {name}? The secret number of {name} is"
NEEDLE = " The secret number of {name} is {number}."
MQAR_INTRO = "Here is a list of word pairs:"
MQAR_AGAIN = ". The same list again:"


@dataclass
class RecallSettings:
    lengths: tuple[int, ...] | None = None  # None: 1K, 2K, 4K, ... up to the teacher's context limit
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 4
    answer_tokens: int = 12
    batch_size: int = 8
    mqar_pairs: tuple[int, ...] = (8, 32, 128)
    mqar_samples: int = 8
    seed: int = 0

    @classmethod
    def small(cls) -> "RecallSettings":
        return cls(lengths=(256, 512), depths=(0.0, 0.5, 1.0), trials=1, batch_size=3, mqar_pairs=(8, 32),
                   mqar_samples=2)


MODEL_NAMES = {"student": "hybrid", "teacher": "teacher"}  # how progress lines name the two models


def default_lengths(limit: int, shortest: int = 1024) -> tuple[int, ...]:
    """Powers of two from `shortest` while below `limit`, then `limit` itself."""
    lengths, length = [], shortest
    while length < limit:
        lengths.append(length)
        length *= 2
    return (*lengths, limit)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS for Llama; nothing for SmolLM2)."""
    return tokenizer("", add_special_tokens=True)["input_ids"]


class Haystack:
    """Held-out prose as a list of encoded sentences, each with its leading space."""

    def __init__(self, tokenizer, min_tokens: int):
        self.sentences: list[list[int]] = []
        total = 0
        for text in documents("prose", "heldout"):
            for sentence in re.split(r"(?<=[.!?;:])\s+", text):
                self.sentences.append(_encode(tokenizer, " " + sentence))
                total += len(self.sentences[-1])
            if total >= 2 * min_tokens:
                break
        if total < min_tokens:
            raise ValueError(f"the held-out prose has {total} tokens, fewer than {min_tokens}")

    def take(self, tokens: int, start: int) -> list[list[int]]:
        """Consecutive sentences from `start` (wrapping) holding at least `tokens` tokens."""
        out, count, i = [], 0, start
        while count < tokens:
            out.append(self.sentences[i % len(self.sentences)])
            count += len(out[-1])
            i += 1
        return out


def passkey_prompt(
    tokenizer, haystack: Haystack, length: int, depth: float, rng: random.Random, number: str | None = None
) -> tuple[list[int], str]:
    """(prompt of exactly `length` tokens, the 7-digit number it hides); `number` replaces the drawn one, so two
    generators in the same state give the same prompt around two different numbers."""
    name, drawn = rng.choice(NAMES), str(rng.randrange(1_000_000, 10_000_000))
    number = number or drawn
    prefix, needle = _prefix(tokenizer), _encode(tokenizer, NEEDLE.format(name=name, number=number))
    question = _encode(tokenizer, QUESTION.format(name=name))
    room = length - len(prefix) - len(needle) - len(question)
    if room <= 0:
        raise ValueError(f"context length {length} is too short for the passkey prompt")
    sentences = haystack.take(room, rng.randrange(len(haystack.sentences)))
    filler = [t for s in sentences for t in s][:room]  # the last sentence is cut so the length is exact
    boundaries = [0]
    for s in sentences:
        boundaries.append(min(boundaries[-1] + len(s), room))
    at = min(boundaries, key=lambda b: abs(b - depth * room))
    return prefix + filler[:at] + needle + filler[at:] + question, number


def passkey_found(text: str, number: str) -> bool:
    """The first 7 digits written (ignoring spaces and commas between them) are the number."""
    return re.sub(r"\D", "", text)[:7] == number


@torch.no_grad()
def _answers(model, prompts: list[list[int]], tokenizer, settings: RecallSettings) -> list[str]:
    ids = torch.tensor(prompts)
    out = greedy_continuations(model, ids, settings.answer_tokens, settings.batch_size, tokenizer.pad_token_id)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def run_passkey(models: dict, tokenizer, settings: RecallSettings, limit: int, log=print) -> dict:
    """{"lengths", "depths", "<model>": accuracy grid [depth][length], "<model>_mean"} for each named model."""
    lengths = settings.lengths or default_lengths(limit)
    haystack = Haystack(tokenizer, max(lengths))
    grids = {name: [[0.0] * len(lengths) for _ in settings.depths] for name in models}
    for j, length in enumerate(lengths):
        rng = random.Random(f"{settings.seed}/{length}")
        cells = [(i, *passkey_prompt(tokenizer, haystack, length, depth, rng))
                 for i, depth in enumerate(settings.depths) for _ in range(settings.trials)]
        for name, model in models.items():
            log(f"passkey @{length}: {len(cells)} prompts, {MODEL_NAMES[name]}")
            answers = _answers(model, [prompt for _, prompt, _ in cells], tokenizer, settings)
            for (i, _, number), answer in zip(cells, answers):
                grids[name][i][j] += passkey_found(answer, number) / settings.trials
    result = {"lengths": list(lengths), "depths": list(settings.depths), "trials": settings.trials}
    for name, grid in grids.items():
        result[name] = grid
        result[f"{name}_mean"] = sum(map(sum, grid)) / (len(lengths) * len(settings.depths))
    return result


def single_token_words(tokenizer, count: int) -> list[str]:
    """`count` distinct lowercase words of held-out prose that encode, with a leading space, to one token."""
    words: dict[str, None] = {}
    for text in documents("prose", "heldout"):
        for word in re.findall(r"\b[a-z]{3,}\b", text):
            if word not in words and len(_encode(tokenizer, " " + word)) == 1:
                words[word] = None
                if len(words) == count:
                    return list(words)
    raise ValueError(f"held-out prose has only {len(words)} single-token words, {count} needed")


def mqar_sample(tokenizer, words: list[str], pairs: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(token ids, positions whose next token is a queried value): pairs, then every key again, shuffled."""
    chosen = rng.sample(words, 2 * pairs)
    keys, values = chosen[:pairs], chosen[pairs:]
    word_ids = {w: _encode(tokenizer, " " + w)[0] for w in chosen}
    colon, comma = _encode(tokenizer, ":"), _encode(tokenizer, ",")
    ids = _prefix(tokenizer) + _encode(tokenizer, MQAR_INTRO)
    for i, (k, v) in enumerate(zip(keys, values)):
        ids += ([] if i == 0 else comma) + [word_ids[k]] + colon + [word_ids[v]]
    ids += _encode(tokenizer, MQAR_AGAIN)
    positions = []
    for i in rng.sample(range(pairs), pairs):
        ids += ([] if not positions else comma) + [word_ids[keys[i]]] + colon
        positions.append(len(ids) - 1)
        ids.append(word_ids[values[i]])
    return ids, positions


@torch.no_grad()
def run_mqar(models: dict, tokenizer, settings: RecallSettings, log=print) -> dict:
    """{"pairs": [...], "<model>": accuracy per pair count, "<model>_mean"} for each named model."""
    words = single_token_words(tokenizer, 2 * max(settings.mqar_pairs))
    result: dict = {"pairs": list(settings.mqar_pairs), "samples": settings.mqar_samples}
    for name in models:
        result[name] = []
    for pairs in settings.mqar_pairs:
        rng = random.Random(f"{settings.seed}/mqar/{pairs}")
        samples = [mqar_sample(tokenizer, words, pairs, rng) for _ in range(settings.mqar_samples)]
        ids = torch.tensor([s[0] for s in samples])  # [S, T]: every sample of one pair count has the same length
        where = torch.tensor([s[1] for s in samples])  # [S, pairs]
        targets = ids.gather(1, where + 1)
        log(f"MQAR {pairs} pairs: {len(samples)} samples, {' then '.join(MODEL_NAMES[n] for n in models)}")
        for name, model in models.items():
            device = next(model.parameters()).device
            hits = 0
            for rows in torch.arange(len(samples)).split(settings.batch_size):
                logits = model(input_ids=ids[rows].to(device), use_cache=False).logits  # [b, T, V]
                picked = logits.gather(1, where[rows].to(device)[..., None].expand(-1, -1, logits.shape[-1]))
                hits += (picked.argmax(-1).cpu() == targets[rows]).sum().item()
            result[name].append(hits / targets.numel())
    for name in models:
        result[f"{name}_mean"] = sum(result[name]) / len(result[name])
    return result


def run_recall(student, teacher, tokenizer, settings: RecallSettings, log=print) -> dict:
    """Passkey and MQAR for the student and (when given) the teacher, with the student's share of the teacher's."""
    models = {"student": student} | ({"teacher": teacher} if teacher is not None else {})
    limit = (teacher if teacher is not None else student).config.max_position_embeddings
    result = {"settings": asdict(settings), "passkey": run_passkey(models, tokenizer, settings, limit, log),
              "mqar": run_mqar(models, tokenizer, settings, log)}
    if teacher is not None:
        for test in ("passkey", "mqar"):
            part = result[test]
            part["relative"] = part["student_mean"] / part["teacher_mean"] if part["teacher_mean"] else None
    return result


def recall_table(result: dict) -> str:
    passkey, mqar = result["passkey"], result["mqar"]
    has_teacher = "teacher" in passkey
    rows = []
    for j, length in enumerate(passkey["lengths"]):
        cells = [sum(g[j] for g in passkey[n]) / len(passkey["depths"]) for n in ("student", "teacher") if n in passkey]
        rows.append([f"passkey @{length}", *cells, cells[0] / cells[1] if has_teacher and cells[1] else None])
    for k, pairs in enumerate(mqar["pairs"]):
        cells = [mqar[n][k] for n in ("student", "teacher") if n in mqar]
        rows.append([f"MQAR {pairs} pairs", *cells, cells[0] / cells[1] if has_teacher and cells[1] else None])
    header = ["recall test", "hybrid", "teacher", "hybrid / teacher"] if has_teacher else ["recall test", "hybrid"]
    if not has_teacher:
        rows = [r[:2] for r in rows]
    return format_table(header, rows)
