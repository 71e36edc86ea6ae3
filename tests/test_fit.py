"""Whether a plan fits: the warning before loading against the memory free, and the notebooks'
table of which Colab GPU takes which model against the plans themselves."""

import torch

from qlora_kit import QuantConfig, check_fits, fit_table, plan_memory
from qlora_kit.fit import COLAB_GPUS
from qlora_kit.plan import GiB

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
