"""Greedy generation for prompts, chat-templated when the tokenizer has a template."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .errors import QLoraKitError


def check_prompts(prompts: list[str]) -> None:
    """An empty prompt gives the model nothing to answer: refuse it instead of printing nothing."""
    for i, prompt in enumerate(prompts, 1):
        if not isinstance(prompt, str) or not prompt.strip():
            raise QLoraKitError(f"prompt {i} is empty ({prompt!r}): give the text the model should answer or continue")


def format_prompt(tokenizer, prompt: str, chat: bool = True, system: str | None = None) -> str:
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt if not system else f"{system}\n\n{prompt}"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, chat: bool = True,
             system: str | None = None, progress: bool = False, batch_size: int = 1) -> list[str]:
    """Greedy answers, one per prompt (the model is put in eval mode and left there); `system` is a system
    message put before each prompt. batch_size > 1 answers several prompts per pass (left-padded):
    much faster on a CPU, and an answer may then differ from the unbatched one by rounding."""
    check_prompts(prompts)
    model.eval()
    device = model.get_input_embeddings().weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens follow every prompt directly
    pad = tokenizer.pad_token
    if pad is None and batch_size > 1:  # padding is masked out: any token will do
        tokenizer.pad_token = tokenizer.eos_token
    answers = []
    try:
        with tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress, leave=False) as bar:
            for start in range(0, len(prompts), batch_size):
                texts = [format_prompt(tokenizer, p, chat, system) for p in prompts[start:start + batch_size]]
                enc = tokenizer(texts, return_tensors="pt", add_special_tokens=False, padding=len(texts) > 1)
                enc = enc.to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
                width = enc["input_ids"].shape[1]
                answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
                bar.update(len(texts))
    finally:
        tokenizer.padding_side = side
        if pad is None and batch_size > 1:
            tokenizer.pad_token = None
    return answers
