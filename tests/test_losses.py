"""The chunked loss equals transformers' loss, and so do its gradients."""

import pytest
import torch

from qlora_kit import LoraConfig, QuantConfig, add_lora, load_model, lora_state_dict
from qlora_kit.losses import IGNORE_INDEX, HeadTransform, causal_lm_loss, chunked_lm_loss


def test_chunked_loss_and_grads_match_transformers(tiny_dir):
    model, _ = load_model(tiny_dir, quant=QuantConfig(compute_dtype=torch.float32), progress=False)
    add_lora(model, LoraConfig(r=4, dropout=0.0, dtype=torch.float32))
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 320, (3, 20), generator=g)
    labels = ids.clone()
    labels[0, :7] = IGNORE_INDEX  # a masked prompt
    labels[2, 15:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    want = {k: p.grad.clone() for k, p in lora_state_dict(model).items()}
    model.zero_grad()
    loss, n = causal_lm_loss(model, ids, labels, mask, chunk_tokens=7)
    loss.backward()
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for k, p in lora_state_dict(model).items():
        torch.testing.assert_close(p.grad, want[k], rtol=1e-5, atol=1e-6)


def test_trainable_head_falls_back_to_checkpointed_chunks_with_same_numbers():
    """A frozen head takes the fused path (input gradient in the forward pass); a trainable one the
    checkpointed chunks. Same loss and input gradient either way, and the head gets its gradient."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(2, 9, 16, generator=g)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[1, :3] = IGNORE_INDEX
    results = []
    for trainable in (False, True):
        head.requires_grad_(trainable)
        h = hidden.clone().requires_grad_(True)
        total, n = chunked_lm_loss(head, h, labels, chunk_tokens=4)
        total.backward()
        results.append((total.detach(), h.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["gemma2", "granite"])
@pytest.mark.parametrize("head_trains", [False, True])
def test_the_models_logit_scaling_and_soft_capping_are_in_the_loss(tiny_dirs, arch, head_trains):
    """fp32. Gemma 2 soft-caps its logits (cap * tanh(z / cap)) and Granite divides them by logits_scaling:
    the chunked loss, on either head path, equals transformers' own loss, and so do the gradients."""
    model, _ = load_model(tiny_dirs(arch), quant=None, dtype="fp32", progress=False)
    transform = HeadTransform.of(model)
    assert transform != HeadTransform(), "the tiny model must exercise the transform"
    model.lm_head.weight.requires_grad_(head_trains)
    model.model.norm.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    expected = model(input_ids=ids, labels=labels).loss
    expected.backward()
    want = model.model.norm.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    loss, n = causal_lm_loss(model, ids, labels, chunk_tokens=5)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.model.norm.weight.grad, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("transform", [HeadTransform(), HeadTransform(scale=0.5, softcap=30.0)],
                         ids=["plain", "scaled-softcapped"])
def test_the_fused_loss_scores_blocks_of_rows_as_autograd_would(dtype, transform):
    """The frozen-head loss scores each chunk in fp32 blocks of rows (several per chunk here: 50k
    vocabulary, 10 rows a block) and overwrites the chunk's logits, in the compute dtype, with their
    gradient: the same loss and input gradient as autograd through head(h).float() and cross-entropy."""
    from qlora_kit.losses import loss_block_rows

    vocab, hidden = 50000, 16
    assert loss_block_rows(vocab) < 24  # more than one block in a chunk
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g).to(dtype))
    states = torch.randn(2, 25, hidden, generator=g).to(dtype)
    labels = torch.randint(0, vocab, (2, 25), generator=g)
    labels[0, :4] = IGNORE_INDEX
    h = states.clone().requires_grad_(True)
    total, n = chunked_lm_loss(head, h, labels, chunk_tokens=24, transform=transform)
    total.backward()
    ref_h = states.clone().requires_grad_(True)
    flat = ref_h[:, :-1].reshape(-1, hidden)
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(transform(head(flat[keep]).float()), y[keep], reduction="sum")
    ref.backward()
    assert n == int(keep.sum()) and h.grad.dtype == dtype
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-4)
    # input gradients of order 1, each a sum over 50k vocabulary rows: fp32 summation order alone moves
    # them by ~1e-5; 16-bit both ways round the probabilities to the compute dtype before the matmul
    tol = {torch.float32: (1e-4, 5e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 1e-3)}[dtype]
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=tol[0], atol=tol[1])
