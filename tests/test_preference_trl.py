"""DPO against TRL's DPOTrainer on the same batch: the same tokens from the same records, and the same loss
and rewards from a PEFT model with the base model as TRL's reference and from ours. Skipped where TRL is not
installed (scripts/setup_env.sh installs it with the bench extra)."""

import json
import math

import pytest
import torch

from qlora_kit import QuantConfig, load_adapter, load_model
from qlora_kit.preference import PreferenceLoss, build_pairs, collate_pairs

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

RECORDS = [
    {"prompt": [{"role": "user", "content": "what is the capital of france?"}],
     "chosen": [{"role": "assistant", "content": "paris."}],
     "rejected": [{"role": "assistant", "content": "the quick brown fox, i think"}]},
    {"prompt": [{"role": "user", "content": "hello, how are you today?"}],
     "chosen": [{"role": "assistant", "content": "i am fine, thank you."}],
     "rejected": [{"role": "assistant", "content": "to be or not to be"}]},
    {"prompt": [{"role": "user", "content": "what does a language model do?"}],
     "chosen": [{"role": "assistant", "content": "it predicts the next token from the ones before it"}],
     "rejected": [{"role": "assistant", "content": "the lazy dog"}]},
]


@pytest.fixture(scope="module")
def peft_adapter(tiny_dirs, tmp_path_factory):
    """(model folder, PEFT adapter folder) with a B that is not zero, so the policy differs from the reference."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_dirs("llama")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("peft-adapter")
    model.save_pretrained(out)
    return model_dir, out


def trl_trainer(model_dir, adapter_dir, tmp_path, loss_type: str, beta: float):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    # TRL's reference for an adapter it is handed is a frozen copy of that adapter (DPO after SFT); ours, for
    # the adapter a run creates, is the base. Handing TRL the base as ref_model makes the two the same.
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[],
                         max_length=None, per_device_train_batch_size=len(RECORDS), use_cpu=True,
                         bf16=False, fp16=False, dataset_num_proc=None, disable_tqdm=True)
    return trl.DPOTrainer(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_list(RECORDS))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trls_dpo_trainer_on_the_same_batch(peft_adapter, tmp_path, loss_type):
    """fp32. TRL tokenises the records, collates chosen then rejected, runs the PEFT model and the base
    model as reference; ours does the same from the same JSON records, the reference being our model with
    its adapters disabled. The ids must be equal
    token for token, and the loss and rewards within 1e-5."""
    model_dir, adapter_dir = peft_adapter
    beta = 0.25
    trainer = trl_trainer(model_dir, adapter_dir, tmp_path, loss_type, beta)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(trl_batch)).item()
    trl_metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["eval"].items()}

    model, tokenizer = load_model(model_dir, quant=None, dtype="fp32", progress=False)
    load_adapter(model, adapter_dir)
    pairs = build_pairs([json.loads(json.dumps(r)) for r in RECORDS], tokenizer, max_seq_len=256)
    ours = collate_pairs(pairs, tokenizer.pad_token_id)
    n = trl_batch["input_ids"].shape[0]
    for i in range(n):  # the same tokens scored, row by row (padding aside)
        keep = trl_batch["attention_mask"][i].bool()
        assert ours["input_ids"][i][ours["attention_mask"][i].bool()].tolist() == trl_batch["input_ids"][i][keep].tolist()
        scored = trl_batch["completion_mask"][i].bool()
        assert (ours["labels"][i] != -100).nonzero().flatten().tolist() == scored.nonzero().flatten().tolist()

    loss_fn = PreferenceLoss(model, "dpo", beta=beta, loss_type=loss_type)
    model.eval()
    with torch.no_grad():
        loss, pairs_n, stats = loss_fn(**ours)
    assert pairs_n == len(RECORDS) and math.isfinite(trl_loss)
    assert loss.item() == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert stats[name].item() == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-5), name
    assert stats["rewards/margins"].abs().item() > 1e-3  # the policy really differs from the reference


def test_quantised_base_serves_as_its_own_reference(peft_adapter):
    """With a 4-bit base (fp32 compute) the reference is the 4-bit model without adapters: equal to the
    log-probabilities of the same quantised model with the adapter's B zeroed in place."""
    model_dir, adapter_dir = peft_adapter
    model, tokenizer = load_model(model_dir, quant=QuantConfig(), dtype="fp32", progress=False)
    load_adapter(model, adapter_dir)
    ours = collate_pairs(build_pairs(RECORDS, tokenizer, max_seq_len=256), tokenizer.pad_token_id)
    loss_fn = PreferenceLoss(model, "dpo")
    ref = loss_fn.reference_logps(ours["input_ids"], ours["labels"], ours["attention_mask"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.zero_()
        _, _, stats = loss_fn(**ours)
    torch.testing.assert_close(stats["logps/chosen"], ref[:len(RECORDS)].mean(), rtol=0, atol=1e-5)
