"""Adapters on quantised bases: no-op at init, only adapters train, merges reproduce the model."""

import copy

import pytest
import torch

from qlora_kit import (LoraConfig, LoraLinear, QLoraKitError, QuantConfig, add_lora, load_model, lora_layers,
                       lora_state_dict, merge_lora, set_gradient_checkpointing, trainable_parameters)

Q4 = QuantConfig(bits=4, compute_dtype=torch.float32)
Q8 = QuantConfig(bits=8, compute_dtype=torch.float32)


def quant_for(bits, dtype):
    return None if bits is None else QuantConfig(bits=bits, compute_dtype=dtype)


def load(folder, bits, dtype, **kw):
    return load_model(folder, quant=quant_for(bits, dtype), dtype=dtype, **kw)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def batch(seed=0, n=2, t=16, vocab=320):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def randomise_b(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


@pytest.mark.parametrize("bits", [4, 8, None], ids=["4bit", "8bit", "unquantised"])
def test_fresh_adapter_leaves_logits_bit_identical(tiny_dir, bits, any_dtype):
    model, _ = load(tiny_dir, bits, any_dtype, progress=False)
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = model(ids).logits.clone()
        add_lora(model, LoraConfig(r=8, dropout=0.0))
        after = model(ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("bits", [4, 8, None], ids=["4bit", "8bit", "unquantised"])
def test_one_step_changes_only_adapters(tiny_dir, bits, any_dtype):
    model, _ = load(tiny_dir, bits, any_dtype, progress=False)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    randomise_b(model)  # so that A gets a gradient too
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    packed = {n: m.base_layer.weight.clone() for n, m in lora_layers(model).items()}
    adapters = {k: v.detach().clone() for k, v in lora_state_dict(model).items()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch()).loss.backward()
    for k, p in lora_state_dict(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{k} got no gradient"
    opt.step()
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), f"frozen {k} changed"
    for n, m in lora_layers(model).items():
        assert torch.equal(m.base_layer.weight, packed[n])
    for k, v in lora_state_dict(model).items():
        assert not torch.equal(v, adapters[k]), f"adapter {k} did not move"


def test_trainable_params_are_exactly_the_adapters(tiny_dir):
    model, _ = load_model(tiny_dir, quant=Q4, progress=False)
    add_lora(model, LoraConfig(r=8))
    trainable, total = trainable_parameters(model)
    c = model.config
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 8 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    assert trainable == per_layer * c.num_hidden_layers
    assert total > trainable
    assert all(p.dtype == torch.float32 for p in lora_state_dict(model).values())  # fp32 masters


@pytest.mark.parametrize("quant", [Q4, Q8], ids=["4bit", "8bit"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-tied"])
def test_merge_reproduces_adapter_model_fp32(tiny_dirs, quant, arch):
    cfg = QuantConfig(bits=quant.bits, compute_dtype=torch.float32)
    model, _ = load_model(tiny_dirs(arch), quant=cfg, progress=False)
    add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, dtype=torch.float32))
    randomise_b(model)
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
        merged = merge_lora(model, torch.float32)
        got = merged(ids).logits
        merged_again = merge_lora(model, torch.float32)(ids).logits  # merging is repeatable
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, merged_again)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_merge_to_16_bit_within_stated_tolerance(tiny_dir, half):
    model, _ = load(tiny_dir, 4, half, progress=False)
    add_lora(model, LoraConfig(r=8, dropout=0.0))
    randomise_b(model)
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = model(ids).logits.float()
        got = merge_lora(model, half)(ids).logits.float()
    # rounding the merged weights and the activations on both sides: a few eps (bf16 2^-7, fp16 2^-10)
    assert rel(got, want) < 2.6 * torch.finfo(half).eps, rel(got, want)


@pytest.mark.parametrize("bits", [4, 8])
def test_eval_train_eval_merge_in_one_process(tiny_dirs, bits, any_dtype):
    """The bitsandbytes CPU repack trap: eval -> train -> eval -> merge must stay correct, on a model
    whose intermediate size (688) is not a multiple of 32, with gradients checked after the eval."""
    path = tiny_dirs("llama", intermediate=688)
    model, _ = load(path, bits, any_dtype, progress=False)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    randomise_b(model)
    b = batch()
    twin = copy.deepcopy(model)  # never evaluated: the reference for the gradients
    model.eval()
    with torch.no_grad():
        first = model(b["input_ids"]).logits.clone()
    with torch.inference_mode():
        model(b["input_ids"])
    model.train()
    twin.train()
    model(**b).loss.backward()
    twin(**b).loss.backward()
    for (k, p), (_, q) in zip(lora_state_dict(model).items(), lora_state_dict(twin).items()):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{k}: no gradient after an eval pass"
        assert torch.equal(p.grad, q.grad), k  # the same ops on the same numbers: an eval pass changed nothing
    model.eval()
    with torch.no_grad():
        second = model(b["input_ids"]).logits
        merged = merge_lora(model)(b["input_ids"]).logits
    assert torch.equal(first, second)
    # the fp32 merge against the model computing in its dtype: 1e-5 in fp32, a few eps in 16 bits
    assert rel(merged, second) < (1e-5 if any_dtype == torch.float32 else 3 * torch.finfo(any_dtype).eps)


def test_generate_then_train_then_generate(tiny_dir):
    model, tok = load_model(tiny_dir, quant=Q4, progress=False)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    ids = tok("hello, how are you", return_tensors="pt").input_ids
    out1 = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    model.train()
    model(**batch()).loss.backward()
    assert all(p.grad is not None for p in lora_state_dict(model).values())
    model.eval()
    out2 = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out1, out2)  # no step taken, B still zero


@pytest.mark.parametrize("bits", [4, None], ids=["4bit", "unquantised"])
def test_gradient_checkpointing_on_off_agree(tiny_dir, bits, dtype):
    def grads(checkpointing):
        model, _ = load(tiny_dir, bits, dtype, progress=False)
        add_lora(model, LoraConfig(r=4, dropout=0.0))
        randomise_b(model)
        set_gradient_checkpointing(model, checkpointing)
        model.train()
        loss = model(**batch()).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in lora_state_dict(model).items()}

    loss_off, g_off = grads(False)
    for checkpointing in (True, 1):   # every block, or the first of two
        loss_on, g_on = grads(checkpointing)
        assert torch.equal(loss_on, loss_off)
        for k in g_on:
            torch.testing.assert_close(g_on[k], g_off[k], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_recomputes(tiny_dir):
    """With checkpointing on, the decoder blocks really run twice per step (forward + recompute);
    with a number of blocks, only the first ones do."""
    model, _ = load_model(tiny_dir, quant=Q4, progress=False)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    calls = {0: [], 1: []}
    for i in calls:
        model.model.layers[i].mlp.register_forward_pre_hook(lambda *a, i=i: calls[i].append(1))
    model.train()
    for on, expected in ((True, [2, 2]), (False, [1, 1]), (1, [2, 1]), (0, [1, 1]), (2, [2, 2])):
        for c in calls.values():
            c.clear()
        set_gradient_checkpointing(model, on)
        model(**batch()).loss.backward()
        assert [len(calls[0]), len(calls[1])] == expected, on
    with pytest.raises(QLoraKitError, match="from 0 to 2"):
        set_gradient_checkpointing(model, 3)


def test_bf16_adapters_track_fp32_adapters(tiny_dir):
    """bf16 adapter compute (fp32 master weights) follows an all-fp32 run of the same steps."""
    def losses(dtype, steps=20, lr=1e-3):
        model, _ = load_model(tiny_dir, quant=QuantConfig(compute_dtype=torch.float32), progress=False)
        add_lora(model, LoraConfig(r=8, dropout=0.0, dtype=dtype, seed=0))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        out = []
        for _ in range(steps):
            loss = model(**batch(0)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return torch.tensor(out)

    l32, l16 = losses(torch.float32), losses(torch.bfloat16)
    assert l16[-1] < l16[0] - 0.5  # it learns
    assert ((l16 - l32).abs() / l32).max() < 1e-2, (l16 - l32).abs().max()


def test_small_updates_are_not_rounded_away(tiny_dir):
    """An update far below bf16's resolution (1e-6 on weights near 0.1) survives in the fp32 masters;
    the same update applied to bf16 parameters would vanish."""
    model, _ = load_model(tiny_dir, quant=Q4, progress=False)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    randomise_b(model)
    params = list(lora_state_dict(model).values())
    before = [p.detach().clone() for p in params]
    model.train()
    model(**batch()).loss.backward()
    with torch.no_grad():
        for p in params:
            p.add_(torch.sign(p.grad) * 1e-6)
    moved = sum(int((p != b).sum()) for p, b in zip(params, before))
    naive = sum(int((p.bfloat16() != b.bfloat16()).sum()) for p, b in zip(params, before))
    total = sum(p.numel() for p in params)
    assert moved > 0.9 * total
    assert naive < 0.05 * total


@pytest.mark.parametrize("targets, expected", [
    ("all-linear", 14), (["q_proj", "v_proj"], 4), (r".*\.mlp\..*", 6), (r"model\.layers\.0\..*_proj", 7),
])
def test_targets(tiny_dir, targets, expected):
    model, _ = load_model(tiny_dir, quant=Q4, progress=False)
    add_lora(model, LoraConfig(r=2, targets=targets))
    names = list(lora_layers(model))
    assert len(names) == expected
    assert not any("lm_head" in n for n in names)


def test_targets_matching_nothing_lists_what_exists(tiny_dir):
    model, _ = load_model(tiny_dir, quant=Q4, progress=False)
    with pytest.raises(QLoraKitError, match="q_proj") as e:
        add_lora(model, LoraConfig(targets=["query_key_value"]))
    assert "match no linear layer" in str(e.value)
    with pytest.raises(QLoraKitError, match="match no linear layer"):
        add_lora(model, LoraConfig(targets=r"transformer\.h\..*"))
    with pytest.raises(QLoraKitError, match="qkv"):
        add_lora(model, LoraConfig(targets=["q_proj", "qkv"]))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(r=0), "positive integer"), (dict(r=-4), "positive integer"), (dict(alpha=0), "alpha"),
    (dict(dropout=1.5), "dropout"), (dict(targets=[]), "empty"), (dict(dtype="int8"), "dtype"),
])
def test_bad_lora_config(kwargs, needle):
    with pytest.raises(QLoraKitError, match=needle):
        LoraConfig(**kwargs)


def test_rslora_scale():
    assert LoraConfig(r=16, alpha=32).scale == 2.0
    assert LoraConfig(r=16, alpha=32, rslora=True).scale == 8.0
