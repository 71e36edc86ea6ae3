"""The chunked loss equals transformers' loss, and so do its gradients."""

import torch

from qlora_kit import LoraConfig, QuantConfig, add_lora, load_model, lora_state_dict
from qlora_kit.losses import IGNORE_INDEX, causal_lm_loss


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
