"""The reports as text: report.txt beside a merged folder, and what the CLI prints after a GGUF export."""

from __future__ import annotations

from ..errors import first_few
from ..io import human_bytes


def format_report(report: dict) -> str:
    """report.txt: what was merged into what, how well it matches, where the time went."""
    lines = [
        "qlora_kit merged export",
        f"base:       {report['base']}",
        f"adapter:    {report['adapter']} (r={report['lora']['r']}, alpha={report['lora']['alpha']}, "
        f"rslora={report['lora']['rslora']}, scale={report['lora']['scale']:.4g})",
        f"merge base: {report['merge_into']}" + (f" (asked for {report['requested_merge_into']})"
                                                 if report["merge_into"] != report["requested_merge_into"] else ""),
        f"quant:      {report['quant']} [{report['quant_source']}]",
        f"written:    {report['tensors']} tensors, {report['adapted_modules']} merged with an adapter, "
        f"{report['shards']} shard(s), {human_bytes(report['out_bytes'])} in {report['dtype']} "
        f"(base {human_bytes(report['base_bytes'])})",
    ]
    v = report.get("verify")
    if v is None:
        lines.append("verify:     skipped")
    else:
        lines.append(f"verify:     loads with no missing/unexpected keys; logits vs {v['reference']} on a "
                     f"{v['batch']} batch, relative error (Frobenius):")
        for base, err in v["logit_rel_error"].items():
            mark = "  <- exported" if base == report["merge_into"] else ""
            lines.append(f"              {base:12s} {err:.3e}{mark}")
    times = report.get("times_s", {})
    lines.append(f"time:       merge {times.get('merge', 0):.1f} s, verify {times.get('verify', 0):.1f} s")
    norms = report["delta_norms"]
    if norms:
        rel = sorted(norms.items(), key=lambda kv: -kv[1]["relative"])
        lines.append("largest adapter deltas (|scale*B@A| / |W|, Frobenius):")
        lines += [f"  {name}: {n['relative']:.3e}" for name, n in rel[:10]]
    return "\n".join(lines) + "\n"


def format_gguf_report(report: dict) -> str:
    """What was written, how close it reads back, and where the time went."""
    lines = [
        "qlora_kit GGUF export",
        f"base:       {report['base']}",
        f"adapter:    {report['adapter']} (r={report['lora']['r']}, alpha={report['lora']['alpha']}, "
        f"scale={report['lora']['scale']:.4g}), merged into the {report['merge_into']} base",
        f"written:    {report['out']}: {report['tensors']} tensors, {human_bytes(report['out_bytes'])} "
        f"({report['gguf_type']}, llama.cpp architecture {report['architecture']}; base {human_bytes(report['base_bytes'])})",
        f"tokenizer:  {report['tokenizer']['model']} / {report['tokenizer']['pre'] or 'sentencepiece'}, "
        f"{report['tokenizer']['tokens']} tokens",
    ]
    if report["f16_fallbacks"]:
        lines.append(f"f16:        {len(report['f16_fallbacks'])} matrices whose rows are not a multiple of 32 "
                     f"({first_few(report['f16_fallbacks'], 3)})")
    v = report["verify"]
    if v is None:
        lines.append("verify:     skipped")
    elif "skipped" in v:
        lines.append(f"verify:     not verified by transformers: {v['skipped']}")
    else:
        tokens = (f"tokenizer ids identical on {v['tokenizer_strings']} strings" if v["tokenizer_strings"] else
                  "SentencePiece vocabulary copied from tokenizer.model, not re-tokenized")
        lines.append(f"verify:     transformers reads it back; logits vs {v['reference']} on a {v['batch']} batch: "
                     f"relative error {v['logit_rel_error']:.3e}; {tokens}")
    t = report.get("times_s", {})
    lines.append(f"time:       write {t.get('write', 0):.1f} s, verify {t.get('verify', 0):.1f} s")
    return "\n".join(lines) + "\n"
