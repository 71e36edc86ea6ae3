"""The demo's task: answer trivia questions in a fixed JSON shape, and how answers are scored.

chatterbot-corpus' trivia questions (installed from PyPI) with its one-phrase answers, asked with one
system instruction:

    system:    Answer with JSON only, in the form {"answer": "<a few words>"}.
    user:      What's the brightest star in the sky?
    assistant: {"answer": "Sirius"}

SmolLM2-135M-Instruct ignores the instruction (it answers in a rambling sentence), so what a short
fine-tune teaches shows on held-out questions as numbers a reader checks at a glance:

    format     share of answers that are exactly a JSON object {"answer": <string>}
    words      median length of the answer (the JSON value where there is one, else the whole reply)
    accuracy   share whose answer contains the reference answer (normalised: case, punctuation,
               articles), JSON or not: the base gets credit for a right fact inside a long reply

A 135M model knows few of these facts, and a fine-tune on 235 other questions teaches it the shape
and the style, not the facts: accuracy is reported as it comes, whichever way it moves.
"""

from __future__ import annotations

import json
import random
import re
import statistics

from .datasets import chatterbot_records

SYSTEM = 'Answer with JSON only, in the form {"answer": "<a few words>"}.'
HELD_OUT = 26
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")


def task_records(seed: int = 0, held_out: int = HELD_OUT) -> tuple[list[dict], list[dict]]:
    """(train, held-out) chat records: the trivia questions shuffled by `seed`, the first `held_out` kept
    apart; each asks with SYSTEM and answers {"answer": <the corpus' answer>}."""
    records = chatterbot_records(["trivia"])
    random.Random(seed).shuffle(records)
    shaped = []
    for r in records:
        question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        shaped.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                                    {"role": "assistant", "content": json.dumps({"answer": answer})}]})
    return shaped[held_out:], shaped[:held_out]


def preference_pairs(records: list[dict], replies: list[str]) -> list[dict]:
    """TRL-format pairs for preference tuning: the corpus' answer in the JSON shape is chosen, the base
    model's own reply to the same question (under the same instruction) is rejected. A reply that
    already is the chosen answer prefers nothing and is left out."""
    pairs = []
    for record, reply in zip(records, replies, strict=True):
        prompt, chosen = record["messages"][:2], record["messages"][2:]
        if reply.strip() and reply.strip() != chosen[0]["content"]:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": [{"role": "assistant", "content": reply}]})
    return pairs


def question_of(record: dict) -> str:
    return record["messages"][1]["content"]


def reference_of(record: dict) -> str:
    return json.loads(record["messages"][2]["content"])["answer"]


def parse_answer(reply: str) -> str | None:
    """The answer of a reply that is exactly {"answer": <string>}, else None."""
    try:
        value = json.loads(reply.strip())
    except ValueError:
        return None
    if isinstance(value, dict) and set(value) == {"answer"} and isinstance(value["answer"], str):
        return value["answer"]
    return None


def normalise(text: str) -> str:
    text = _ARTICLES.sub(" ", _PUNCTUATION.sub(" ", text.lower()))
    return " ".join(text.split())


def is_correct(reply: str, reference: str) -> bool:
    """The reference (normalised) appears as whole words in the answer, JSON or not."""
    answer = parse_answer(reply)
    wanted, said = normalise(reference), normalise(reply if answer is None else answer)
    return bool(wanted) and f" {wanted} " in f" {said} "


def score(replies: list[str], references: list[str]) -> dict:
    """format, accuracy (shares in [0, 1]) and median answer words over paired replies and references."""
    if not replies or len(replies) != len(references):
        raise ValueError("score needs one reply per reference")
    answers = [parse_answer(r) for r in replies]
    words = [len((a if a is not None else r).split()) for a, r in zip(answers, replies)]
    return {"n": len(replies),
            "format": sum(a is not None for a in answers) / len(replies),
            "accuracy": sum(is_correct(r, ref) for r, ref in zip(replies, references)) / len(replies),
            "words": statistics.median(words)}
