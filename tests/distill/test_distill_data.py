"""Data: local text / jsonl / parquet through `datasets`, document-level held-out split, packing, seeded order, sharding."""

import json

import datasets
import pytest
import torch

from hybridize.distill.data import BlockOrder, StageData, load_documents, pack, repeat_parts, stage_data
from hybridize.distill.recipe import DataConfig
from hybridize.errors import UserError

TEXTS = [f"document {i}: " + "alpha beta gamma delta " * (5 + i) for i in range(30)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def test_jsonl_text_and_parquet_give_the_same_documents(tmp_path, jsonl, tokenizer):
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    (text_dir / "a.txt").write_text("\n".join(TEXTS[:15]) + "\n")
    (text_dir / "b.txt").write_text("\n".join(TEXTS[15:]) + "\n")
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": TEXTS}).to_parquet(str(parquet))
    loaded = {}
    for name, config in {
        "jsonl": DataConfig(source=str(jsonl), text_field="body", held_out_fraction=0.0),
        "text": DataConfig(source=str(text_dir), held_out_fraction=0.0),  # the text builder: one line, one document
        "parquet": DataConfig(source=str(parquet), held_out_fraction=0.0),
    }.items():
        docs = load_documents(config, tokenizer, seed=0)
        loaded[name] = sorted(tuple(ids) for ids in docs.train["input_ids"])
        assert docs.record["documents"] == {"train": 30, "held_out": 0}
    assert loaded["jsonl"] == loaded["text"] == loaded["parquet"]
    eos = [tokenizer.eos_token_id]
    expected = sorted(tuple(tokenizer(t, add_special_tokens=False)["input_ids"] + eos) for t in TEXTS)
    assert loaded["jsonl"] == expected


def test_held_out_documents_are_split_off_by_seed(jsonl, tokenizer):
    def split(seed):
        docs = load_documents(DataConfig(source=str(jsonl), text_field="body", held_out_fraction=0.2), tokenizer, seed)
        return [tuple(x) for x in docs.train["input_ids"]], [tuple(x) for x in docs.held_out["input_ids"]]

    train, held = split(0)
    assert len(held) == 6 and len(train) == 24 and not set(train) & set(held)
    assert split(0) == (train, held)  # deterministic
    assert set(split(1)[1]) != set(held)  # another seed, another split


def test_max_documents_caps_after_the_shuffle(jsonl, tokenizer):
    docs = load_documents(DataConfig(source=str(jsonl), text_field="body", max_documents=10, held_out_fraction=0.0),
                          tokenizer, seed=0)
    assert len(docs.train) == 10
    first_ten = {tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS[:10]}
    assert {tuple(x[:-1]) for x in docs.train["input_ids"]} != first_ten


def test_default_corpus_source(tokenizer):
    docs = load_documents(DataConfig(domains=["prose"], max_documents=12, held_out_fraction=0.25), tokenizer, seed=0)
    assert docs.record["source"] == "corpus" and docs.record["documents"] == {"train": 9, "held_out": 3}
    assert docs.record["tokens"]["train"] > 9 * 100  # KJV chapters are hundreds of tokens each


def test_packing_cuts_the_eos_joined_stream_into_full_blocks():
    tokenized = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 0]],
                                            "num_tokens": [4, 3, 5]})
    blocks = pack(tokenized, seq_len=5)
    assert blocks[:]["input_ids"].tolist() == [[1, 2, 3, 0, 4], [5, 0, 6, 7, 8]]  # the last partial block is dropped


def test_block_order_is_a_seeded_permutation_per_epoch():
    order = BlockOrder(7, seed=3)
    first, second = order.blocks(0, 7), order.blocks(7, 7)
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert BlockOrder(7, seed=3).blocks(5, 6) == (first + second)[5:11]  # position k is the same block from anywhere
    assert BlockOrder(7, seed=4).blocks(0, 7) != first


def test_global_batches_are_the_same_for_any_world_size():
    blocks = datasets.Dataset.from_dict({"input_ids": [[i] * 3 for i in range(23)]}).with_format("torch")
    data = StageData(train=blocks, held_out=blocks, seq_len=3, order=BlockOrder(23, seed=0))
    global_batch = 8
    for step in (0, 1, 5):  # step 5 runs into the second epoch
        expected = data.order.blocks(step * global_batch, global_batch)
        for world, micro in ((1, 2), (2, 2), (4, 1), (2, 4)):
            rounds = global_batch // (micro * world)
            seen = [row[0].item() for rank in range(world) for m in range(rounds)
                    for row in data.train_batch(step, m, micro, global_batch, rank, world)]
            assert sorted(seen) == sorted(expected), (world, micro)


def test_eval_batches_cover_the_same_sequences_for_any_world_size():
    blocks = datasets.Dataset.from_dict({"input_ids": [[i] * 3 for i in range(10)]}).with_format("torch")
    data = StageData(train=blocks, held_out=blocks, seq_len=3, order=BlockOrder(10, seed=0))
    for world in (1, 2, 4, 8):
        for micro in (2, 3, 8):
            shares = [data.eval_batches(micro, 8, rank, world) for rank in range(world)]
            seen = sorted(row[0].item() for batches in shares for batch in batches for row in batch)
            assert seen == list(range(8)), (world, micro)
            # the same batch sizes on every rank, none larger than the micro batch
            sizes = {tuple(len(batch) for batch in batches) for batches in shares}
            assert len(sizes) == 1 and max(next(iter(sizes))) <= micro, (world, micro, sizes)


def test_eval_batches_leave_out_only_the_remainder_over_the_world_size():
    blocks = datasets.Dataset.from_dict({"input_ids": [[i] * 3 for i in range(10)]}).with_format("torch")
    data = StageData(train=blocks, held_out=blocks, seq_len=3, order=BlockOrder(10, seed=0))
    # 7 sequences over 2 ranks with micro batches of 8: 3 each (one batch of 3), the 7th left out
    shares = [data.eval_batches(8, 7, rank, 2) for rank in range(2)]
    assert [[len(batch) for batch in batches] for batches in shares] == [[3], [3]]
    # more sequences asked than held out: all 10 over 4 ranks is 2 each
    assert sum(len(batch) for rank in range(4) for batch in data.eval_batches(8, 100, rank, 4)) == 8


def test_data_errors_are_one_line(tmp_path, jsonl, tokenizer):
    (tmp_path / "empty").mkdir()
    cases = [
        (DataConfig(source=str(tmp_path / "nowhere.jsonl")), "data.source: .*nowhere.jsonl does not exist"),
        (DataConfig(source=str(jsonl)), "data.text_field: column 'text' is not in .*columns: body, id"),
        (DataConfig(source=str(tmp_path / "empty")), "has no .* files"),
    ]
    for config, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            load_documents(config, tokenizer, seed=0)
        assert "\n" not in str(caught.value)


def test_a_sequence_length_the_data_cannot_fill_is_one_line(jsonl, tokenizer):
    docs = load_documents(DataConfig(source=str(jsonl), text_field="body", held_out_fraction=0.0), tokenizer, seed=0)
    tokens = docs.record["tokens"]["train"]
    with pytest.raises(UserError) as caught:
        stage_data(docs, "kd", seq_len=tokens // 2, global_batch=4, seed=0)
    message = str(caught.value)
    assert "\n" not in message and f"({tokens} tokens) fills 2 sequences of seq_len {tokens // 2}" in message
    data = stage_data(docs, "kd", seq_len=16, global_batch=4, seed=0)
    assert data.train[0]["input_ids"].shape == (16,) and torch.is_tensor(data.train_batch(0, 0, 2, 4, 0, 1))


def test_library_source_counts_the_tokens_of_each_part(tmp_path, tokenizer):
    root = tmp_path / "root"
    root.mkdir()
    code = "def scale(value):\n    return value * 2  # twice\n" * 20
    docs = "This guide says what the package computes and why it does so. " * 12
    (root / "scale.py").write_text(code)
    (root / "guide.md").write_text(docs)
    config = DataConfig(source="library", roots=[str(root)], domains=["code", "docs"], held_out_fraction=0.0)
    loaded = load_documents(config, tokenizer, seed=0)
    expected = {name: len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
                for name, text in (("code", code), ("docs", docs))}
    assert loaded.record["tokens_by_part"] == expected
    assert loaded.record["tokens"]["train"] == sum(expected.values())
    assert loaded.record["source"] == "library" and loaded.record["parts"]["code"]["documents"] == 1
    again = load_documents(config, tokenizer, seed=0)
    assert list(again.train["input_ids"]) == list(loaded.train["input_ids"])  # same order and content


def parts_dataset(lengths_by_part: dict[str, list[int]]) -> datasets.Dataset:
    """Tokenized documents as load_documents makes them: ids (each row distinct), token counts and parts."""
    rows = {"input_ids": [], "num_tokens": [], "part": []}
    for part, lengths in lengths_by_part.items():
        for length in lengths:
            rows["input_ids"].append([len(rows["part"])] * length)
            rows["num_tokens"].append(length)
            rows["part"].append(part)
    return datasets.Dataset.from_dict(rows)


def library_root(tmp_path):
    """Twelve small modules and one guide: a library root with code and docs."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    for i in range(12):
        (root / f"module_{i}.py").write_text(f"def scale_{i}(value):\n    return value * {i}  # scaled\n" * 12)
    (root / "guide.md").write_text("This guide says what the package computes and why it does so. " * 12)
    return root


def test_repeat_parts_reaches_each_share_and_reads_the_largest_part_once():
    lengths = {"code": [40 + 7 * i for i in range(30)], "docs": [13, 29, 8], "prose": [55, 21]}
    train = parts_dataset(lengths)
    shares = {"code": 0.5, "docs": 0.25, "prose": 0.25}
    weighted, record = repeat_parts(train, shares, seed=3)
    tokens = {part: sum(n) for part, n in lengths.items()}
    pool = tokens["code"] / shares["code"]  # code has the most tokens per unit of share: read once
    copies = {}
    for ids in weighted["input_ids"]:
        copies[ids[0]] = copies.get(ids[0], 0) + 1
    code_rows = range(len(lengths["code"]))
    assert all(copies[row] == 1 for row in code_rows)
    for part, share in shares.items():
        # whole copies, then documents until the fraction is reached: overshoot below one document
        assert 0 <= record["tokens"][part] - share * pool < max(lengths[part])
        assert abs(record["repeats"][part] - share * pool / tokens[part]) < 1e-3
    assert record["tokens"] == {part: sum(n for ids, n in zip(weighted["input_ids"], weighted["num_tokens"])
                                          if train["part"][ids[0]] == part) for part in shares}
    again, _ = repeat_parts(train, shares, seed=3)
    assert again["input_ids"] == weighted["input_ids"]  # deterministic
    other, other_record = repeat_parts(train, shares, seed=4)
    assert other_record["tokens"] == record["tokens"] and other["input_ids"] != weighted["input_ids"]
    parts_in_order = [train["part"][ids[0]] for ids in weighted["input_ids"]]
    assert parts_in_order != sorted(parts_in_order, key=list(shares).index)  # the pool is shuffled, not part by part


def test_part_shares_weight_the_library_training_split_and_leave_the_held_out_split(tmp_path, tokenizer):
    plain = DataConfig(source="library", roots=[str(library_root(tmp_path))], domains=["code", "docs"],
                       held_out_fraction=0.2)
    weighted = DataConfig(**{**plain.__dict__, "part_shares": {"code": 0.6, "docs": 0.4}})
    natural, shared = load_documents(plain, tokenizer, seed=0), load_documents(weighted, tokenizer, seed=0)
    assert list(shared.held_out["input_ids"]) == list(natural.held_out["input_ids"])
    assert "docs" not in set(natural.held_out["part"])  # the single docs document is training text
    counts = shared.record["part_shares"]["tokens"]
    assert counts["code"] == natural.record["tokens_by_part"]["code"] - sum(natural.held_out["num_tokens"])
    assert counts["docs"] >= 0.4 / 0.6 * counts["code"]
    assert shared.record["part_shares"]["repeats"]["code"] == 1.0
    data = stage_data(shared, "kd", seq_len=32, global_batch=4, seed=0)
    assert len(data.train) > len(stage_data(natural, "kd", seq_len=32, global_batch=4, seed=0).train)


def test_part_shares_name_a_part_without_training_tokens(tmp_path, tokenizer):
    root = tmp_path / "root"
    root.mkdir()
    (root / "scale.py").write_text("def scale(value):\n    return value * 2  # twice\n" * 20)
    config = DataConfig(source="library", roots=[str(root)], domains=["code", "docs"], held_out_fraction=0.0,
                        part_shares={"code": 0.5, "docs": 0.5})
    with pytest.raises(UserError, match=r"^data.part_shares: no training tokens in part\(s\) docs$"):
        load_documents(config, tokenizer, seed=0)


def test_repeat_parts_reads_the_largest_part_once_through_rounding():
    # 1006 tokens at share 0.7: share * (tokens / share) / tokens is 1.0000000000000002 in floating point
    train = parts_dataset({"code": [500, 506], "docs": [30, 41]})
    weighted, record = repeat_parts(train, {"code": 0.7, "docs": 0.3}, seed=0)
    assert record["tokens"]["code"] == 1006
    assert sorted(ids[0] for ids in weighted["input_ids"] if ids[0] < 2) == [0, 1]


def test_the_library_is_tokenized_once_per_text_and_tokenizer(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    root = library_root(tmp_path)
    config = DataConfig(source="library", roots=[str(root)], domains=["code", "docs"], held_out_fraction=0.2)
    first = load_documents(config, tokenizer, seed=5)
    assert len(list((tmp_path / "cache" / "library-tokens").iterdir())) == 1
    calls = []
    original = tokenizer.__class__.__call__
    monkeypatch.setattr(tokenizer.__class__, "__call__",
                        lambda self, *args, **kwargs: calls.append(1) or original(self, *args, **kwargs))
    again = load_documents(config, tokenizer, seed=5)
    assert calls == []  # read back from the cache, not tokenized
    for split in ("train", "held_out"):
        assert list(getattr(again, split)["input_ids"]) == list(getattr(first, split)["input_ids"])
        assert list(getattr(again, split)["part"]) == list(getattr(first, split)["part"])
    assert again.record == first.record
    reshuffled = load_documents(config, tokenizer, seed=6)  # the cache holds the read order; the seed still shuffles
    assert calls == [] and list(reshuffled.train["input_ids"]) != list(first.train["input_ids"])
    documents = [sorted(tuple(ids) for split in (docs.train, docs.held_out) for ids in split["input_ids"])
                 for docs in (first, reshuffled)]
    assert documents[0] == documents[1]
    (root / "module_3.py").write_text("def changed():\n    return 'new text'\n" * 30)
    changed = load_documents(config, tokenizer, seed=5)
    assert calls  # new text, new key: tokenized again
    assert len(list((tmp_path / "cache" / "library-tokens").iterdir())) == 2
    assert changed.record["digest"] != first.record["digest"]


def test_a_capped_library_is_tokenized_after_the_cap_and_not_cached(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    config = DataConfig(source="library", roots=[str(library_root(tmp_path))], domains=["code", "docs"],
                        held_out_fraction=0.0, max_documents=3)
    lengths = []
    original = tokenizer.__class__.__call__
    monkeypatch.setattr(tokenizer.__class__, "__call__",
                        lambda self, text, **kwargs: lengths.append(len(text)) or original(self, text, **kwargs))
    loaded = load_documents(config, tokenizer, seed=0)
    assert len(loaded.train) == 3 and sum(lengths) == 3  # three documents tokenized, of the thirteen read
    assert not (tmp_path / "cache" / "library-tokens").exists()
