"""Training text: documents from the offline corpus, the installed library, local files or the Hub, tokenized,
packed and ordered by seed.

Order of work: load documents -> shuffle them by seed -> cap at max_documents -> split off the held-out
documents (before packing, so no document is in both sets) -> tokenize once (eos after each document) -> repeat
the library's parts to their shares of the training tokens, if asked -> pack per stage into blocks of that stage's
seq_len. The whole library (no max_documents) is tokenized before the shuffle instead, which orders it the same
way, and cached per text and tokenizer. Training visits blocks in an order fixed by the seed and the epoch, and
position k of that stream is the same block for every world size, so a resumed run or a run on more GPUs sees the
same global batches; a stage with `copied_spans` changes some of those blocks, by position (copied_spans.py).
"""

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from datasets.fingerprint import Hasher

from .. import corpus, library
from ..atomic import write_cache_folder
from ..errors import UserError
from ..teacher import cache_root, hub_reachable
from .copied_spans import copy_spans
from .recipe import CopiedSpans, DataConfig

FILE_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                ".parquet": "parquet"}
PACK_DOCUMENTS = 1000  # documents concatenated per packing batch; each batch drops its last partial block


@dataclass
class Documents:
    """Tokenized documents ("input_ids" with a trailing eos), split into train and held-out."""

    train: datasets.Dataset
    held_out: datasets.Dataset
    record: dict = field(default_factory=dict)  # what was read, for the run record


def load_documents(config: DataConfig, tokenizer, seed: int) -> Documents:
    """Read, shuffle, cap, split and tokenize the documents named by `config`; one UserError line if there are none."""
    dataset, record = _read_source(config)
    if config.text_field not in dataset.column_names:
        raise UserError(f"data.text_field: column {config.text_field!r} is not in {config.source} "
                        f"(columns: {', '.join(dataset.column_names)})")
    # A source whose documents come in parts (the library) keeps the column, for the token count of each part.
    dataset = dataset.select_columns([config.text_field] + (["part"] if "part" in dataset.column_names else []))
    if config.text_field != "text":
        dataset = dataset.rename_column(config.text_field, "text")
    dataset = dataset.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True,
                             desc="dropping empty documents")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the teacher's tokenizer has no eos token to separate packed documents")
    # The whole library is the same text on every run of a machine: tokenized once. A capped one (--smoke) is
    # tokenized after the cap, like any other source: a few documents, not minutes of text.
    pretokenized = config.source == "library" and config.max_documents is None
    if pretokenized:
        dataset = _library_tokens(dataset, tokenizer, eos, record["digest"], config.num_proc)
    dataset = dataset.shuffle(seed=seed).flatten_indices()
    if config.max_documents is not None and len(dataset) > config.max_documents:
        dataset = dataset.select(range(config.max_documents))
    if len(dataset) == 0:
        raise UserError(f"data.source: {config.source} holds no non-empty documents")
    held = 0 if config.held_out_fraction == 0 else max(1, round(config.held_out_fraction * len(dataset)))
    if held >= len(dataset):
        raise UserError(f"data.held_out_fraction: {config.held_out_fraction} of {len(dataset)} documents "
                        "leaves none to train on")
    tokenized = dataset if pretokenized else _tokenized(dataset, tokenizer, eos, config.num_proc)
    count = len(dataset)
    train = tokenized.select(range(count - held))
    held_out = tokenized.select(list(range(count - held, count)))  # a list: select() rejects an empty range at the end
    record = {**record, "documents": {"train": len(train), "held_out": len(held_out)},
              "tokens": {"train": _count(train), "held_out": _count(held_out)}}
    if "part" in tokenized.column_names:
        record["tokens_by_part"] = _count_by_part(tokenized)
    if config.part_shares:
        train, record["part_shares"] = repeat_parts(train, config.part_shares, seed)
    return Documents(train=train, held_out=held_out, record=record)


def repeat_parts(train: datasets.Dataset, shares: dict[str, float], seed: int) -> tuple[datasets.Dataset, dict]:
    """The training documents with each part repeated so that parts hold `shares` of the tokens; and the record.

    The part with the most tokens per unit of share is read once and sets the pool's size; every other part is
    repeated r = share * pool / tokens >= 1 times: floor(r) whole copies, then its first documents (in the seeded
    order) until the fraction's tokens are reached. The pool is then shuffled by seed, so copies of a document
    land in different packing batches. The held-out split is not touched.
    """
    tokens = _count_by_part(train)
    missing = [part for part in shares if tokens.get(part, 0) == 0]
    if missing:
        raise UserError(f"data.part_shares: no training tokens in part(s) {', '.join(missing)}")
    pool = max(tokens[part] / share for part, share in shares.items())
    rows_by_part: dict[str, list[int]] = {part: [] for part in shares}
    for row, part in enumerate(train["part"]):
        rows_by_part[part].append(row)
    lengths = train["num_tokens"]
    chosen: list[int] = []
    repeats = {}
    for part, share in shares.items():
        repeats[part] = share * pool / tokens[part]
        whole = math.floor(repeats[part])
        chosen.extend(rows_by_part[part] * whole)
        wanted, taken = round((repeats[part] - whole) * tokens[part]), 0  # rounded: the part read once adds none
        for row in rows_by_part[part]:
            if taken >= wanted:
                break
            chosen.append(row)
            taken += lengths[row]
    order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed))
    weighted = train.select([chosen[i] for i in order.tolist()])
    counts = _count_by_part(weighted)
    total = sum(counts.values())
    record = {"requested": dict(shares), "repeats": {part: round(r, 3) for part, r in repeats.items()},
              "tokens": counts, "shares": {part: round(n / total, 4) for part, n in counts.items()}}
    return weighted, record


def _tokenized(dataset: datasets.Dataset, tokenizer, eos: int, num_proc: int | None) -> datasets.Dataset:
    return dataset.map(_tokenize, batched=True, remove_columns=["text"], num_proc=num_proc, desc="tokenizing",
                       fn_kwargs={"tokenizer": tokenizer, "eos": eos})


def _library_tokens(dataset: datasets.Dataset, tokenizer, eos: int, digest: str,
                    num_proc: int | None) -> datasets.Dataset:
    """The library's documents tokenized, in read order; from the cache when the same text (its digest) met the same
    tokenizer before. Tokenizing the library takes 1-11 minutes; loading it back, seconds."""
    key = Hasher.hash((digest, eos, tokenizer))[:16]
    target = cache_root() / "library-tokens" / key
    if (target / "dataset_info.json").exists():
        return datasets.load_from_disk(str(target), keep_in_memory=True)
    tokenized = _tokenized(dataset, tokenizer, eos, num_proc)
    write_cache_folder(target, "dataset_info.json", lambda folder: tokenized.save_to_disk(str(folder)))
    return tokenized


def _tokenize(batch: dict, tokenizer, eos: int) -> dict:
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [row + [eos] for row in ids], "num_tokens": [len(row) + 1 for row in ids]}


def _count(tokenized: datasets.Dataset) -> int:
    return int(sum(tokenized["num_tokens"])) if len(tokenized) else 0


def _count_by_part(tokenized: datasets.Dataset) -> dict[str, int]:
    counts: dict[str, int] = {}
    for part, tokens in zip(tokenized["part"], tokenized["num_tokens"]):
        counts[part] = counts.get(part, 0) + tokens
    return dict(sorted(counts.items()))


def _read_source(config: DataConfig) -> tuple[datasets.Dataset, dict]:
    source = config.source
    if source == "library":
        documents, record = library.read_library(config.roots, config.domains)
        texts = {"text": [d.text for d in documents], "part": [d.part for d in documents]}
        return datasets.Dataset.from_dict(texts), record
    if source == "corpus":
        texts = [text for domain in config.domains for text in corpus.documents(domain, "train")]
        record = {"source": "corpus", "domains": list(config.domains), "split": "train",
                  "python": sys.version.split()[0]}
        return datasets.Dataset.from_dict({"text": texts}), record
    path = Path(source).expanduser()
    if path.exists():
        return _read_files(path)
    if source.startswith((".", "/", "~")) or path.suffix in FILE_FORMATS:
        raise UserError(f"data.source: {source} does not exist")
    return _read_hub(config)


def _read_files(path: Path) -> tuple[datasets.Dataset, dict]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_FORMATS)
    if not files:
        raise UserError(f"data.source: {path} has no {', '.join(sorted(FILE_FORMATS))} files")
    formats = {FILE_FORMATS.get(p.suffix) for p in files}
    if None in formats or len(formats) > 1:
        raise UserError(f"data.source: {path}: use files of one format ({', '.join(sorted(FILE_FORMATS))}); "
                        f"found {', '.join(sorted({p.suffix or p.name for p in files}))}")
    try:
        dataset = datasets.load_dataset(formats.pop(), data_files=[str(p) for p in files], split="train")
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise UserError(f"data.source: {path} could not be read: {str(err).splitlines()[0]}") from err
    record = {"source": str(path), "files": {str(p): p.stat().st_size for p in files}}
    return dataset, record


def _read_hub(config: DataConfig) -> tuple[datasets.Dataset, dict]:
    offline = any(os.environ.get(flag, "0") not in ("0", "") for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not hub_reachable():
        raise UserError(f"data.source: {config.source!r} is not a local path, and the Hugging Face Hub cannot be "
                        "reached to fetch it as a dataset (with HF_HUB_OFFLINE=1 a cached copy is used)")
    record = {"source": f"hub:{config.source}", "subset": config.subset, "split": config.split}
    try:
        if config.max_documents is None:
            dataset = datasets.load_dataset(config.source, config.subset, split=config.split)
        else:
            # Stream just the first max_documents instead of downloading every shard of a large dataset.
            dataset = datasets.Dataset.from_generator(_stream_texts, gen_kwargs={
                "name": config.source, "subset": config.subset, "split": config.split,
                "text_field": config.text_field, "count": config.max_documents,
            })
            record["streamed_documents"] = config.max_documents
    except Exception as err:  # datasets raises many types (network, missing config, offline cache miss)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"data.source: Hub dataset {config.source!r} could not be loaded: {reason}") from err
    return dataset, record


def _stream_texts(name: str, subset: str | None, split: str, text_field: str, count: int):
    stream = datasets.load_dataset(name, subset, split=split, streaming=True)
    for row in stream.take(count):
        yield {text_field: row[text_field]}


def pack(tokenized: datasets.Dataset, seq_len: int, num_proc: int | None = None) -> datasets.Dataset:
    """Blocks of exactly seq_len tokens: documents concatenated (eos-separated) and cut, torch-formatted."""
    packed = tokenized.map(
        _pack_batch, batched=True, batch_size=PACK_DOCUMENTS, remove_columns=tokenized.column_names,
        num_proc=num_proc, fn_kwargs={"seq_len": seq_len}, desc=f"packing to {seq_len} tokens",
    )
    return packed.with_format("torch", columns=["input_ids"])


def _pack_batch(batch: dict, seq_len: int) -> dict:
    stream = [token for row in batch["input_ids"] for token in row]
    usable = len(stream) - len(stream) % seq_len
    return {"input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)]}


class BlockOrder:
    """Position k of the endless training stream -> a block: epoch k // n, each epoch a permutation by (seed, epoch)."""

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks, self.seed = num_blocks, seed
        self._epoch, self._permutation = -1, torch.empty(0, dtype=torch.long)

    def _block(self, position: int) -> int:
        epoch = position // self.num_blocks
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.num_blocks, generator=generator)
        return int(self._permutation[position % self.num_blocks])

    def blocks(self, start: int, count: int) -> list[int]:
        return [self._block(k) for k in range(start, start + count)]


@dataclass
class StageData:
    """One stage's packed blocks and the global-batch arithmetic that deals them to processes."""

    train: datasets.Dataset
    held_out: datasets.Dataset
    seq_len: int
    order: BlockOrder
    copied_spans: CopiedSpans | None = None  # applied to training blocks only
    seed: int = 0

    def train_batch(self, step: int, micro: int, micro_batch: int, global_batch: int, rank: int,
                    world: int) -> torch.Tensor:
        """[micro_batch, seq_len]: micro batch `micro` of process `rank` in optimizer step `step`.

        Step s owns stream positions [s * G, (s + 1) * G); micro batch m of rank r takes the slice at
        (m * world + r) * micro_batch, so the union over ranks and micro batches is that same global batch.
        """
        start = self.stream_start(step, micro, micro_batch, global_batch, rank, world)
        blocks = self.train[self.order.blocks(start, micro_batch)]["input_ids"]
        return blocks if self.copied_spans is None else copy_spans(blocks, start, self.copied_spans, self.seed)

    @staticmethod
    def stream_start(step: int, micro: int, micro_batch: int, global_batch: int, rank: int, world: int) -> int:
        """Stream position of the first sequence of that micro batch (train_batch's rows follow it)."""
        return step * global_batch + (micro * world + rank) * micro_batch

    def eval_batches(self, micro_batch: int, sequences: int, rank: int, world: int) -> list[torch.Tensor]:
        """This rank's share of the first `sequences` held-out blocks, in micro batches (the last may be smaller).

        Every rank gets the same number of sequences in the same batch sizes (FSDP needs every rank in each
        forward), and for any world size dividing the count, the union is the same set of sequences, so the mean is
        comparable. Only the remainder of `sequences` over `world` is left out, never a whole micro batch per rank.
        """
        share = min(sequences, len(self.held_out)) // world
        first = rank * share
        return [self.held_out[first + start : first + min(start + micro_batch, share)]["input_ids"]
                for start in range(0, share, micro_batch)]

    def record(self) -> dict:
        return {"seq_len": self.seq_len, "train_blocks": len(self.train), "held_out_blocks": len(self.held_out)}


def stage_data(documents: Documents, stage_name: str, seq_len: int, global_batch: int, seed: int,
               num_proc: int | None = None, copied_spans: CopiedSpans | None = None) -> StageData:
    """Pack the documents for one stage; one UserError line if they cannot fill a global batch of sequences."""
    train = pack(documents.train, seq_len, num_proc)
    tokens = documents.record["tokens"]["train"]
    if len(train) < global_batch:
        raise UserError(
            f"stage {stage_name!r}: the training data ({tokens} tokens) fills {len(train)} sequences of seq_len "
            f"{seq_len}, fewer than one global batch of {global_batch}; use more data or a shorter seq_len"
        )
    held_out = pack(documents.held_out, seq_len, num_proc) if len(documents.held_out) else documents.held_out
    return StageData(train=train, held_out=held_out, seq_len=seq_len, order=BlockOrder(len(train), seed),
                     copied_spans=copied_spans, seed=seed)
