"""The demo's task and its scores: what 'format', 'accuracy' and 'words' count, on hand-made replies."""

import json

import pytest

from qlora_kit.demo import format_summary
from qlora_kit.demo_task import (SYSTEM, is_correct, parse_answer, preference_pairs, question_of, reference_of, score,
                                 task_records)


def test_records_ask_with_the_instruction_and_answer_in_json():
    train, held_out = task_records()
    assert len(held_out) == 26 and len(train) > 200
    assert not {question_of(r) for r in train} & {question_of(r) for r in held_out}
    r = held_out[0]
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
    assert r["messages"][0]["content"] == SYSTEM
    assert json.loads(r["messages"][2]["content"]) == {"answer": reference_of(r)}
    assert task_records()[1] == held_out  # the split is fixed


@pytest.mark.parametrize("reply, answer", [
    ('{"answer": "Sirius"}', "Sirius"), ('  {"answer": "Sirius"}\n', "Sirius"),
    ('The answer is {"answer": "Sirius"}', None), ('{"answer": "Sirius", "why": "bright"}', None),
    ('{"answer": 3}', None), ("Sirius", None), ('["Sirius"]', None),
])
def test_parse_answer_takes_exactly_the_shape(reply, answer):
    assert parse_answer(reply) == answer


@pytest.mark.parametrize("reply, reference, correct", [
    ('{"answer": "Sirius"}', "Sirius", True),
    ("The brightest star in the sky is actually Sirius, the Dog Star.", "Sirius", True),  # credit outside JSON
    ('{"answer": "The Parent Trap"}', "Parent Trap", True),  # articles and case do not count
    ('{"answer": "Vega"}', "Sirius", False),
    ('{"answer": "Siriusly"}', "Sirius", False),  # whole words only
    ('{"answer": ""}', "", False),
])
def test_is_correct(reply, reference, correct):
    assert is_correct(reply, reference) is correct


def test_score_counts_shares_and_median_words():
    replies = ['{"answer": "Sirius"}', "It is Vega, a very bright star.", '{"answer": "Paris, France"}']
    s = score(replies, ["Sirius", "Sirius", "Paris"])
    assert s == {"n": 3, "format": 2 / 3, "accuracy": 2 / 3, "words": 2}
    with pytest.raises(ValueError):
        score(replies, ["Sirius"])


def test_summary_reads_as_a_table():
    s = {"model": "m", "task": "t", "instruction": SYSTEM, "held_out": 2, "steps": 3,
         "eval_loss": {"before": 5.0, "after": 2.0},
         "before": {"n": 2, "format": 0.0, "accuracy": 0.5, "words": 20},
         "after": {"n": 2, "format": 1.0, "accuracy": 0.5, "words": 2},
         "answers": [{"question": "Q|1", "reference": "R", "before": "long\nreply " * 20, "after": '{"answer": "R"}'}],
         "phases_s": {"ask before": 1.0, "train": 2.0, "total": 3.0}, "peak_memory": {"rss_mib": 900.0},
         "run_dir": "runs/x", "export": None}
    text = format_summary(s)
    assert "| format: reply is exactly {\"answer\": ...} | 0% | 100% |" in text
    assert "| accuracy: answer contains the reference | 50% | 50% |" in text
    assert "| loss on the reference answers | 5.000 | 2.000 |" in text
    assert "Q\\|1" in text and "\n" not in text.split("| Q\\|1")[1].split("\n")[0]  # one row, pipes escaped
    assert "train 2 s" in text and "peak RSS 900 MiB" in text


def test_preference_pairs_reject_the_base_reply_and_drop_ties():
    _, held_out = task_records()
    records = held_out[:3]
    replies = ["It was probably in the 1990s, in the United States.", "", json.dumps({"answer": reference_of(records[2])})]
    pairs = preference_pairs(records, replies)
    assert len(pairs) == 1  # an empty reply and one equal to the chosen answer prefer nothing
    assert pairs[0]["prompt"] == records[0]["messages"][:2] and pairs[0]["chosen"] == records[0]["messages"][2:]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": replies[0]}]
