"""Whether a plan fits: the warning before loading against the memory free, and the notebooks'
table of which Colab GPU takes which model against the plans themselves."""

import pytest
import torch

from qlora_kit import QLoraKitError, QuantConfig, check_fits, fit_table, plan_memory
from qlora_kit.fit import COLAB_GPUS, default_budget, fewest_checkpointed_blocks, parse_budget
from qlora_kit.plan import GiB, MiB

BF16 = QuantConfig(compute_dtype=torch.bfloat16)


def test_check_fits_warns_only_past_the_free_memory():
    plan = plan_memory("llama-3.1-8b", BF16, batch=2, seq_len=2048)
    assert check_fits(plan, "cpu", free_bytes=plan.total + 1) is None
    warning = check_fits(plan, "cpu", free_bytes=4 * GiB)
    assert "4.0 GiB free" in warning and "lower batch or seq_len" in warning
    assert check_fits(plan_memory("llama-2-7b", BF16, device="cpu"), "cpu") in (None, check_fits(
        plan_memory("llama-2-7b", BF16, device="cpu"), "cpu"))   # asks the host without failing


def test_fit_table_agrees_with_the_plans():
    table = fit_table(["mistral-7b", "qwen2.5-32b"], seq_len=1024, quant=BF16)
    header, mistral, qwen = table.splitlines()
    assert all(name in header for name in COLAB_GPUS)
    plan = plan_memory("mistral-7b", BF16, seq_len=1024)
    t4 = plan.max_batch_seq(COLAB_GPUS["T4 16GB (free)"], (1024,))[1024]
    assert mistral.split()[0] == "mistral-7b" and f"batch {t4}" in mistral and t4 >= 1
    assert f"{plan.total / GiB:.1f} GiB" in mistral
    assert qwen.split()[-1] != "-" and " - " in qwen            # 32B: not on a T4, yes on an A100 40GB


# ---------------------------------------------------------------------------------------------
# The budget and the fewest checkpointed blocks that fit it


@pytest.mark.parametrize("text,expected", [("12GiB", 12 * GiB), ("16 GB", 16 * 10 ** 9), ("800MiB", 800 * MiB),
                                           ("1.5gib", int(1.5 * GiB)), (4096, 4096), ("4096", 4096)])
def test_budgets_read_as_users_write_them(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["12 bananas", "-3GiB", "0", "GiB", "", True])
def test_a_nonsense_budget_is_a_clear_error(text):
    with pytest.raises(QLoraKitError, match="write a positive size such as 12GiB"):
        parse_budget(text)


def test_fewest_checkpointed_blocks_is_the_edge_of_fitting():
    """Checkpointing more blocks never raises the plan; the choice is the first count that fits:
    one block fewer does not. No checkpointing where everything fits, all of them where nothing does."""
    plan = plan_memory("llama-3.1-8b", BF16, batch=2, seq_len=4096)
    totals = [plan.with_settings(gradient_checkpointing=k).total for k in range(33)]
    assert all(a >= b for a, b in zip(totals, totals[1:])) and totals[0] > 1.5 * totals[-1]
    for budget in (16 * GiB, 24 * GiB, 40 * GiB):
        chosen = fewest_checkpointed_blocks(plan, budget)
        k = chosen.settings["checkpointed_blocks"]
        assert 0 < k < 32 and chosen.total <= budget < totals[k - 1], budget
        assert f"ckpt {k}/32" in chosen.summary() and chosen.settings["gradient_checkpointing"] == k
    assert fewest_checkpointed_blocks(plan, 10 ** 15).settings["gradient_checkpointing"] is False
    assert " no-ckpt " in fewest_checkpointed_blocks(plan, 10 ** 15).summary()
    nothing = fewest_checkpointed_blocks(plan, GiB)
    assert nothing.settings["gradient_checkpointing"] is True and nothing.total > GiB


def test_default_budget_is_half_the_available_ram_on_cpu(monkeypatch):
    monkeypatch.setattr("qlora_kit.fit.free_memory", lambda device: 10 * GiB)
    assert default_budget("cpu") == (5 * GiB, "50% of the available RAM")
