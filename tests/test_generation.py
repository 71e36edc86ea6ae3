"""generate: greedy answers with an optional system message, one prompt at a time or several per pass."""

import pytest
import torch

from qlora_kit import QLoraKitError, QuantConfig, load_model
from qlora_kit.generation import format_prompt, generate

PROMPTS = ["what is 1 plus one?", "hello there, how are you today?", "hi"]


def test_batched_answers_equal_one_at_a_time(tiny_dir):
    model, tok = load_model(tiny_dir, quant=QuantConfig(compute_dtype=torch.float32), progress=False)
    side = tok.padding_side
    single = generate(model, tok, PROMPTS, max_new_tokens=6, system="Be brief.")
    batched = generate(model, tok, PROMPTS, max_new_tokens=6, system="Be brief.", batch_size=3)
    assert batched == single
    assert tok.padding_side == side  # left padding was only for the batch


def test_system_message_and_empty_prompts(tiny_dir):
    _, tok = load_model(tiny_dir, quant=QuantConfig(compute_dtype=torch.float32), progress=False)
    text = format_prompt(tok, "hi", system="Be brief.")
    assert text.index("Be brief.") < text.index("hi")
    with pytest.raises(QLoraKitError, match="prompt 2 is empty"):
        generate(None, tok, ["hi", "  "])
