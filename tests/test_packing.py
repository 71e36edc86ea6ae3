"""Packing changes the speed, not the loss: a packed batch gives each example the loss and adapter gradients
it gets alone (fp32), for Llama, Qwen2 and Gemma-style models, 4-bit base with adapters."""

import pytest
import torch
import torch.nn.functional as F

from qlora_kit import LoraConfig, QuantConfig, add_lora, load_model
from qlora_kit.data import collate
from qlora_kit.losses import IGNORE_INDEX, causal_lm_loss
from qlora_kit.trainer import real_tokens

LENGTHS = [7, 19, 4, 12, 9, 3]


def examples(vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3:]  # a prompt, then the trained response
        out.append((ids, labels))
    return out


def adapted_model(model_dir):
    model, _ = load_model(model_dir, quant=QuantConfig(), dtype="fp32", progress=False)
    add_lora(model, LoraConfig(r=4, dropout=0.0, targets="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero; give it values so the adapters change the outputs
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0, 0.05)
    return model


def adapter_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def per_token_losses(model, batch) -> torch.Tensor:
    """Next-token losses at every position (0 where there is no target), from full logits."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(targets.shape)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gemma2"])
def test_packed_batch_equals_examples_one_by_one(tiny_dirs, arch):
    model = adapted_model(tiny_dirs(arch))
    model.eval()  # no dropout, so one run and the other see the same function
    batch_examples = examples(model.config.vocab_size)

    alone, alone_grads = [], None
    for ex in batch_examples:
        total, n = causal_lm_loss(model, **collate([ex], pad_id=0))
        (total * n).backward()  # summed, so the grads add up to the packed batch's summed loss
        alone.append(total.item() * n)
        grads = adapter_grads(model)
        alone_grads = grads if alone_grads is None else {k: alone_grads[k] + grads[k] for k in grads}

    packed = collate(batch_examples, pad_id=0, pack_to=24)
    assert "position_ids" in packed and packed["input_ids"].shape[0] < len(batch_examples)
    mean, n = causal_lm_loss(model, **packed)
    (mean * n).backward()
    packed_grads = adapter_grads(model)
    assert n == sum(sum(lab != IGNORE_INDEX for lab in labels[1:]) for _, labels in batch_examples)
    assert (mean * n).item() == pytest.approx(sum(alone), rel=1e-5)
    for name, g in alone_grads.items():
        # fp32 sums in another order: within 1e-5 of the gradient's largest entry (measured: 2e-6 at most)
        assert (packed_grads[name] - g).abs().max() <= 1e-5 * g.abs().max(), name

    # each example's own loss, read off the packed rows segment by segment
    with torch.no_grad():
        losses = per_token_losses(model, packed)
    starts = (packed["position_ids"] == 0).nonzero().tolist()
    found = []
    for (row, at), (next_row, next_at) in zip(starts, starts[1:] + [[None, None]]):
        end = next_at if next_row == row else packed["input_ids"].shape[1]
        if (packed["labels"][row, at + 1:end] != IGNORE_INDEX).any():  # the padding sequence has none
            found.append(losses[row, at:end - 1].sum().item())
    assert sorted(found) == pytest.approx(sorted(alone), rel=1e-5)


def test_padding_only_batches_stay_unpacked_and_tokens_count_real_ones(tiny_dirs):
    ex = examples(320)
    assert real_tokens(ex) == sum(LENGTHS)
    same = [ex[1], ex[1]]  # equal lengths: packing saves nothing, so the plain batch (and SDPA's causal path)
    assert "attention_mask" in collate(same, pad_id=0, pack_to=64)
