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
    lines += heldout_lines(report.get("heldout"))
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
        f"({report['gguf_type']}, llama.cpp architecture {report['architecture']}; base {human_bytes(report['base_bytes'])})"
        + (f"; quantised by llama.cpp from a {human_bytes(report['quantised_from']['bytes'])} "
           f"{report['quantised_from']['type']} merge" if report.get("quantised_from") else ""),
        f"tokenizer:  {report['tokenizer']['model']} / {report['tokenizer']['pre'] or 'sentencepiece'}, "
        f"{report['tokenizer']['tokens']} tokens",
    ]
    if report["f16_fallbacks"]:
        lines.append(f"f16:        {len(report['f16_fallbacks'])} matrices whose rows are not a multiple of 32 "
                     f"({first_few(report['f16_fallbacks'], 3)})")
    if report.get("k_fallbacks"):
        fallbacks = report["k_fallbacks"]
        lines.append(f"fallback:   {len(fallbacks)} matrices whose rows are not a multiple of 256, stored by llama.cpp "
                     f"in another type ({first_few(f'{n} {t}' for n, t in fallbacks.items())})")
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
    if v is not None and "llama_cpp" in v:
        q = v["llama_cpp"]
        lines.append(f"            {report['gguf_type']} in llama.cpp vs {q['reference']} on {q['tokens']} tokens: "
                     f"logit relative error {q['logit_rel_error']:.3e}")
    lines += heldout_lines(report.get("heldout"))
    if report.get("ollama"):
        o = report["ollama"]
        match = {True: "renders a sample conversation as the model's own template does",
                 False: "differs from the model's own template (see the note)", None: "not compared"}
        lines.append(f"Modelfile:  {o['family'] or 'no chat template'} template, {match[o['template_matches_model']]}; "
                     f"stops {', '.join(o['stops']) or 'none'}; "
                     + ", ".join(f"{k} {v}" for k, v in o["parameters"].items()))
        lines += [f"            note: {note}" for note in o["notes"]]
    t = report.get("times_s", {})
    lines.append(f"time:       write {t.get('write', 0):.1f} s, verify {t.get('verify', 0):.1f} s"
                 + (f", llama.cpp quantise {t['quantise']:.1f} s" if "quantise" in t else ""))
    return "\n".join(lines) + "\n"


def heldout_lines(heldout: dict | None) -> list[str]:
    """Held-out perplexity of the trained adapter, the merged model and the written file, side by side."""
    if heldout is None:
        return ["held-out:   not measured (pass --eval-file held_out.jsonl)"]
    d = heldout["data"]
    lines = [f"held-out:   perplexity on {d['file']}: {d['examples']} of {d['of_records']} examples, "
             f"{d['scored_tokens']} scored of {d['tokens']} tokens (capped at {d['max_tokens']})"]
    rows = [("adapter on the quantised base (transformers, fp32)", heldout["adapter"]),
            ("merged model (transformers, fp32)", heldout["merged"])]
    if heldout["gguf"] is not None:
        rows.append(("the GGUF file in llama.cpp", heldout["gguf"]))
    lines += [f"              {name:52s} {value:.4f}" for name, value in rows]
    if heldout.get("gguf_skipped"):
        lines.append(f"              the GGUF file in llama.cpp: not measured, {heldout['gguf_skipped']}")
    return lines
