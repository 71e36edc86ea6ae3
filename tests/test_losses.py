"""The chunked loss equals transformers' loss, and so do its gradients."""

import torch

from qlora_kit import LoraConfig, QuantConfig, add_lora, load_model, lora_state_dict
from qlora_kit.losses import IGNORE_INDEX, causal_lm_loss, chunked_lm_loss


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
