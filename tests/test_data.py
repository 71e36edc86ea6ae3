"""Data: three JSONL shapes, loss masks, EOS, padding, truncation, packing and bad lines."""

import json

import pytest

from qlora_kit import QLoraKitError
from qlora_kit.data import (DataStats, build_dataset, collate, microbatches, pack_rows, prepare_tokenizer, read_jsonl,
                            split, tokenize)
from qlora_kit.losses import IGNORE_INDEX
from tiny import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(make_tokenizer())


def trained_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_text_trains_every_token_and_ends_in_eos(tok):
    ids, labels = tokenize({"text": "to be or not to be"}, tok)
    assert ids == labels and ids[-1] == tok.eos_token_id


def test_chat_masks_everything_but_assistant_turns(tok):
    rec = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"},
                        {"role": "user", "content": "and you"}, {"role": "assistant", "content": "the dog"}]}
    ids, labels = tokenize(rec, tok)
    text = trained_text(tok, ids, labels)
    assert "fine" in text and "the dog" in text
    assert "hello" not in text and "and you" not in text and "user" not in text
    assert labels.count(tok.eos_token_id) == 2  # each reply ends in its end-of-turn token, trained


def test_alpaca_is_a_chat(tok):
    ids, labels = tokenize({"instruction": "what is", "input": "the capital", "output": "paris"}, tok)
    assert trained_text(tok, ids, labels).startswith("paris") and tok.eos_token_id in labels
    assert "capital" in tok.decode(ids) and "capital" not in trained_text(tok, ids, labels)


def test_pad_token_is_not_eos():
    t = make_tokenizer()
    t.pad_token = t.eos_token
    t = prepare_tokenizer(t)
    assert t.pad_token_id != t.eos_token_id
    batch = collate([([5, 6, t.eos_token_id], [5, 6, t.eos_token_id]), ([7], [7])], t.pad_token_id)
    assert batch["labels"][0, 2] == t.eos_token_id  # EOS stays in the loss
    assert batch["labels"][1, 1] == IGNORE_INDEX and batch["attention_mask"][1, 1] == 0


def test_fallback_chat_template():
    t = make_tokenizer()
    t.chat_template = None
    t = prepare_tokenizer(t)
    ids, labels = tokenize({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, t)
    assert "<|im_start|>assistant" in t.decode(ids)


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken\n{"foo": 1}\n')
    with pytest.raises(QLoraKitError, match=r"d.jsonl, line 2"):
        read_jsonl(f)
    stats = DataStats()
    assert len(read_jsonl(f, "skip", stats)) == 1
    assert len(stats.skipped) == 2 and ":3:" in stats.skipped[1]


@pytest.mark.parametrize("content, needle", [("", "no examples"), ('{"messages": []}\n', "non-empty list"),
                                             ('{"messages": [{"role": "user", "content": "x"}]}\n', "assistant")])
def test_empty_or_useless_files(tmp_path, content, needle):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(QLoraKitError, match=needle):
        read_jsonl(f)


def test_missing_file(tmp_path):
    with pytest.raises(QLoraKitError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_truncation_counted_and_all_too_long_is_an_error(tok):
    long = {"messages": [{"role": "user", "content": "hello " * 50}, {"role": "assistant", "content": "fine"}]}
    short = {"text": "the dog"}
    ds = build_dataset([long, short, {"text": "the quick brown fox " * 20}], tok, max_seq_len=16)
    assert ds.stats.truncated == 2 and ds.stats.dropped_all_masked == 1 and len(ds) == 2
    assert all(len(ids) <= 16 for ids, _ in ds.examples)
    with pytest.raises(QLoraKitError, match="every example is longer than data.max_seq_len=16"):
        build_dataset([long, long], tok, max_seq_len=16)


def test_pack_rows_best_fit_longest_first():
    rows = pack_rows([5, 9, 3, 7, 1, 2], capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum([5, 9, 3, 7, 1, 2][i] for i in row) <= 10 for row in rows)
    assert rows == [[1, 4], [3, 2], [0, 5]]  # 9+1, 7+3, 5+2: three rows, the fewest possible
    assert pack_rows([10, 10], 10) == [[0], [1]] and pack_rows([], 4) == []


def test_collate_packs_when_it_computes_fewer_tokens(tok):
    short, long_ = ([5, 6, 7], [-100, 6, 7]), (list(range(10, 20)), [-100] * 5 + list(range(15, 20)))
    batch = collate([short, long_, short], pad_id=0, pack_to=13)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, 13)
    assert batch["input_ids"][0].tolist() == list(range(10, 20)) + [5, 6, 7]
    assert batch["position_ids"][0].tolist() == list(range(10)) + [0, 1, 2]
    # the first token of each example is no target: it would be predicted from the example before it
    assert batch["labels"][0].tolist() == [-100] * 5 + list(range(15, 20)) + [-100, 6, 7]
    # the padding is a sequence of its own (positions from 0), and no target
    assert batch["input_ids"][1].tolist() == [5, 6, 7] * 1 + [0] * 10
    assert batch["position_ids"][1].tolist() == [0, 1, 2] + list(range(10))
    assert (batch["labels"][1, 3:] == -100).all()
    # where packing saves nothing the batch is padded as before
    plain = collate([long_, long_], pad_id=0, pack_to=16)
    assert set(plain) == {"input_ids", "labels", "attention_mask"} and plain["input_ids"].shape == (2, 10)
    assert collate([short, long_], 0, pack_to=None)["input_ids"].shape == (2, 10)


def test_split_is_fixed_and_disjoint():
    recs = [{"text": str(i)} for i in range(50)]
    tr, ev = split(recs, 0.1, seed=3)
    assert len(ev) == 5 and len(tr) == 45 and split(recs, 0.1, seed=3) == (tr, ev)
    assert not {json.dumps(r) for r in tr} & {json.dumps(r) for r in ev}


def test_microbatches_shard_and_resume(tok):
    ds = build_dataset([{"text": f"the dog {i}"} for i in range(10)], tok, 32)
    one = microbatches(ds, 2, seed=0)
    seq = [next(one) for _ in range(12)]
    resumed = microbatches(ds, 2, seed=0, start=7)
    assert [next(resumed) for _ in range(5)] == seq[7:]
    r0, r1 = microbatches(ds, 2, 0, rank=0, world=2), microbatches(ds, 2, 0, rank=1, world=2)
    merged = sorted([next(r0) for _ in range(6)] + [next(r1) for _ in range(6)], key=lambda x: x[0])
    assert merged == seq
