"""Preference pairs and losses: TRL's data format, response-only log-probabilities through the chunked
head, the reference model as the same model with adapters off, and DPO / ORPO against the papers'
formulas written out plainly."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from qlora_kit import LoraConfig, QLoraKitError, QuantConfig, add_lora, load_model, lora_layers
from qlora_kit.adapt import adapters_disabled
from qlora_kit.data import DataStats, collate, prepare_tokenizer
from qlora_kit.losses import IGNORE_INDEX, sequence_logps
from qlora_kit.preference import (build_pairs, dpo_loss, encode_response, orpo_odds_ratio, pair_messages)

FP32 = QuantConfig(compute_dtype=torch.float32)
PAIR = {"prompt": "Who wrote Hamlet?", "chosen": "Shakespeare.", "rejected": "Marlowe, I think."}
CHAT = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"}],
        "chosen": [{"role": "assistant", "content": "Shakespeare."}],
        "rejected": [{"role": "assistant", "content": "Marlowe, I think."}]}


def test_both_formats_give_the_same_messages():
    prompt, chosen, rejected = pair_messages(PAIR)
    assert prompt == [{"role": "user", "content": "Who wrote Hamlet?"}]
    assert chosen == [{"role": "assistant", "content": "Shakespeare."}]
    assert pair_messages(CHAT) == (CHAT["prompt"], CHAT["chosen"], CHAT["rejected"])


@pytest.mark.parametrize("record, needle", [
    ({"prompt": "q", "chosen": "a"}, "lacks 'rejected'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "the same response"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "'rejected' is empty"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "all strings or all"),
    ({**CHAT, "chosen": [{"role": "user", "content": "a"}]}, "must end with the assistant turn"),
    ({**CHAT, "prompt": [{"role": "usr", "content": "q"}]}, "did you mean 'user'"),
    (["q", "a", "b"], "JSON object"),
])
def test_bad_pairs_say_what_is_wrong(record, needle):
    with pytest.raises(QLoraKitError, match=needle):
        pair_messages(record)


@pytest.fixture
def tok(tiny_dir):
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(tiny_dir)))


def test_only_the_response_is_labelled(tok):
    prompt, chosen, _ = pair_messages(CHAT)
    ids, labels = encode_response(prompt, chosen, tok)
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert ids[:len(tok(head, add_special_tokens=False)["input_ids"])] == tok(head, add_special_tokens=False)["input_ids"]
    assert tok.decode(trained).startswith("Shakespeare.<|im_end|>") and tok.eos_token_id in trained


def test_truncation_keeps_the_prompt_and_counts(tok):
    prompt, chosen, rejected = pair_messages(PAIR)
    fits = max(len(encode_response(prompt, side, tok)[0]) for side in (chosen, rejected))
    long = {**PAIR, "chosen": "Shakespeare wrote it. " * 20}
    stats = DataStats()
    pairs = build_pairs([long, PAIR], tok, max_seq_len=fits, stats=stats)
    assert stats.truncated == 1 and stats.examples == 2 and all(len(p.chosen[0]) <= fits for p in pairs)
    head = len(tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"])
    assert pairs[0].chosen[0][:head] == pairs[1].chosen[0][:head]  # the cut is at the end: the prompt stays
    with pytest.raises(QLoraKitError, match="no preference pair keeps a response token"):
        build_pairs([long], tok, max_seq_len=head)


def model_with_trained_adapters(tiny_dir, dtype=torch.float32):
    model, _ = load_model(tiny_dir, quant=QuantConfig(compute_dtype=dtype), load_tokenizer=False, progress=False)
    add_lora(model, LoraConfig(r=4, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    return model


def reference_logps(model, batch):
    """log p of each labelled token from the full logits, summed per row: the plain way."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logp.gather(2, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(1), mask.sum(1)


# Log-probabilities: rtol, atol. fp32 agrees to the last bits; in 16-bit the two paths round differently.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 5e-2), torch.float16: (5e-3, 1e-2)}
# Gradients in 16-bit: the relative (Frobenius) error of each adapter's gradient, since single entries
# near zero differ by rounding alone; fp32 is compared entry by entry (rtol 1e-4, atol 1e-5).
GRAD_ERROR = {torch.bfloat16: 1e-2, torch.float16: 3e-3}  # measured: 2.9e-3, 5.9e-4


def test_sequence_logps_and_gradients_match_full_logits(tiny_dir, tok, any_dtype):
    pairs = build_pairs([PAIR, CHAT], tok, max_seq_len=64)
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], tok.pad_token_id)
    model = model_with_trained_adapters(tiny_dir, any_dtype)
    params = [p for p in model.parameters() if p.requires_grad]

    ours, counts = sequence_logps(model, **batch, chunk_tokens=5)  # several chunks, one crossing rows
    ours.sum().backward()
    ours_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    plain, plain_counts = reference_logps(model, batch)
    plain.sum().backward()
    rtol, atol = TOLERANCES[any_dtype]
    torch.testing.assert_close(ours, plain, rtol=rtol, atol=atol)
    assert counts.tolist() == plain_counts.tolist()
    for a, b in zip(ours_grads, [p.grad for p in params]):
        if any_dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        else:
            assert float((a - b).norm() / b.norm()) < GRAD_ERROR[any_dtype]


def test_reference_pass_is_the_base_model(tiny_dir, tok, any_dtype):
    pairs = build_pairs([PAIR, CHAT], tok, max_seq_len=64)
    batch = collate([p.chosen for p in pairs], tok.pad_token_id)
    model = model_with_trained_adapters(tiny_dir, any_dtype)
    base, _ = load_model(tiny_dir, quant=QuantConfig(compute_dtype=any_dtype), load_tokenizer=False, progress=False)
    with torch.no_grad():
        adapted = sequence_logps(model, **batch)[0]
        with adapters_disabled(model):
            reference = sequence_logps(model, **batch)[0]
        expected = sequence_logps(base, **batch)[0]
        again = sequence_logps(model, **batch)[0]
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(adapted, reference)            # the adapters do change the model
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)  # and come back on leaving the block
    with pytest.raises(QLoraKitError, match="no LoRA adapters"):
        with adapters_disabled(base):
            pass


def plain_dpo(pc, pr, rc, rr, beta, loss_type):
    """DPO (Rafailov et al. 2023), IPO (Azar et al. 2023) and the hinge variant, one pair at a time."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - c) - (b - d)
        if loss_type == "sigmoid":
            out.append(-math.log(1.0 / (1.0 + math.exp(-beta * h))))
        elif loss_type == "hinge":
            out.append(max(0.0, 1.0 - beta * h))
        else:
            out.append((h - 1.0 / (2.0 * beta)) ** 2)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_gradient_match_the_formula(loss_type, beta):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 - 10 for _ in range(4))
    pc.requires_grad_(True)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta, loss_type)
    torch.testing.assert_close(losses.detach(), plain_dpo(pc.detach(), pr, rc, rr, beta, loss_type))
    torch.testing.assert_close(chosen_r, beta * (pc.detach() - rc))
    torch.testing.assert_close(rejected_r, beta * (pr - rr))
    losses.sum().backward()
    eps = 1e-6  # central differences of the plain formula
    numeric = (plain_dpo(pc.detach() + eps, pr, rc, rr, beta, loss_type)
               - plain_dpo(pc.detach() - eps, pr, rc, rr, beta, loss_type)) / (2 * eps)
    torch.testing.assert_close(pc.grad, numeric, rtol=1e-4, atol=1e-6)
    with pytest.raises(QLoraKitError, match="did you mean 'hinge'"):
        dpo_loss(pc, pr, rc, rr, beta, "hinje")


def test_orpo_odds_ratio_matches_the_formula():
    """ORPO (Hong et al. 2024): odds(y) = P / (1 - P) with P the mean-token probability."""
    g = torch.Generator().manual_seed(2)
    chosen, rejected = (-torch.rand(5, generator=g, dtype=torch.float64) * 3 - 0.05 for _ in range(2))
    chosen.requires_grad_(True)
    losses, log_odds = orpo_odds_ratio(chosen, rejected, beta=0.1)

    def plain(c, r):
        odds = lambda lp: math.exp(lp) / (1.0 - math.exp(lp))  # noqa: E731
        return [-0.1 * math.log(1.0 / (1.0 + odds(b) / odds(a))) for a, b in zip(c, r)]

    c, r = chosen.detach().tolist(), rejected.tolist()
    torch.testing.assert_close(losses.detach(), torch.tensor(plain(c, r), dtype=torch.float64))
    torch.testing.assert_close(log_odds.detach(), torch.tensor(
        [math.log(math.exp(a) / (1 - math.exp(a))) - math.log(math.exp(b) / (1 - math.exp(b))) for a, b in zip(c, r)],
        dtype=torch.float64))
    losses.sum().backward()
    eps = 1e-6
    numeric = [(p - m) / (2 * eps) for p, m in zip(plain([x + eps for x in c], r), plain([x - eps for x in c], r))]
    torch.testing.assert_close(chosen.grad, torch.tensor(numeric, dtype=torch.float64), rtol=1e-4, atol=1e-7)


def test_orpo_term_equals_trls_when_trl_is_importable():
    """TRL's ORPOTrainer.odds_ratio_loss on the same batch: its losses are beta * log sigmoid(log odds)
    (subtracted from the NLL), ours the same with the sign folded in. TRL's DPO loss lives inside its
    trainer's step; its formula (sigmoid, hinge, and IPO on per-token averaged log-ratios) is the one
    test_dpo_loss_and_gradient_match_the_formula checks."""
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(3)
    chosen, rejected = (-torch.rand(7, generator=g) * 3 - 0.05 for _ in range(2))
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_r, rejected_r, _, log_odds = orpo.ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    ours, our_log_odds = orpo_odds_ratio(chosen, rejected, beta=0.1)
    torch.testing.assert_close(ours, -losses)
    torch.testing.assert_close(our_log_odds.mean(), log_odds)
    torch.testing.assert_close(chosen_r, 0.1 * chosen)
