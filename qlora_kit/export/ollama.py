"""An Ollama folder: the merged GGUF plus a Modelfile, for `ollama create NAME -f OUT/Modelfile`.

    OUT/model.gguf    the GGUF export (any --gguf-type; q4_k_m is what Ollama users usually run)
    OUT/Modelfile     FROM ./model.gguf, the chat template in Ollama's Go-template syntax, the default
                      system prompt, stop tokens, context length and sampling parameters
    OUT/report.json   the GGUF export's report, with what the Modelfile says and how it was checked

Why families and not a translator: chat templates are Jinja programs, and Ollama's are Go templates;
no general translation exists. But the models people fine-tune ship a handful of formats, each
recognisable by its turn markers. Each family is one `ChatFormat` (what opens and closes each role's
turn, what opens the reply), from which both the Go template and a Python rendering are made; the
export renders a sample conversation with the model's own Jinja template and with the family's
rendering, and reports whether they agree (Llama 3.1's date preamble, say, is not reproduced).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QLoraKitError
from ..io import atomic_dir, check_replace, refuse_overlap
from ..models import model_location, resolve_model_path
from .gguf import export_gguf
from .report import format_gguf_report

GGUF_NAME, MODELFILE = "model.gguf", "Modelfile"
OLLAMA_FILES = (GGUF_NAME, MODELFILE, "report.json", "report.txt")
DEFAULT_NUM_CTX = 4096  # Ollama allocates the whole context up front; the model may allow far more
SAMPLE = [{"role": "system", "content": "You answer in one short sentence."},
          {"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "Paris is the capital of France."},
          {"role": "user", "content": "And of Italy?"}]


@dataclass(frozen=True)
class ChatFormat:
    """One family of chat templates: the text around each role's turn and what opens the reply."""

    name: str
    marker: str  # text of the Jinja source that identifies the family
    turns: dict[str, tuple[str, str]]  # role -> (before the content, after it)
    reply: str  # what opens the assistant's reply (the generation prompt)
    stops: tuple[str, ...]
    fold_system: str | None = None  # no system turn: the system text and this open the next user message

    def render(self, messages: list[dict]) -> str:
        """The conversation as this format writes it, reply opened: what the Go template renders."""
        text, system = "", ""
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "system" and self.fold_system is not None:
                system = m["content"]
                continue
            before, after = self.turns[m["role"]]
            content = m["content"]
            if m["role"] == "user" and system:
                content, system = system + self.fold_system + content, ""
            if m["role"] == "assistant" and last:
                after = ""  # a last assistant message is continued, not closed
            text += before + content + after + (self.reply if last and m["role"] == "user" else "")
        return text

    def go_template(self) -> str:
        """The same rendering in Ollama's template language, over .Messages (text only in string literals,
        so the layout's whitespace is trimmed and never part of the prompt)."""
        def lit(s: str) -> str:
            return "{{ " + json.dumps(s, ensure_ascii=False) + " }}" if s else ""

        lines = ['{{- $system := "" }}'] if self.fold_system is not None else []
        lines += ["{{- range $i, $_ := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}"]
        if self.fold_system is not None:
            lines.append("{{- if eq .Role \"system\" }}{{ $system = .Content }}")
            user_content = ("{{ if $system }}{{ $system }}" + lit(self.fold_system)
                            + '{{ $system = "" }}{{ end }}{{ .Content }}')
        else:
            before, after = self.turns["system"]
            lines.append("{{- if eq .Role \"system\" }}" + lit(before) + "{{ .Content }}" + lit(after))
            user_content = "{{ .Content }}"
        before, after = self.turns["user"]
        reply = "{{ if $last }}" + lit(self.reply) + "{{ end }}" if self.reply else ""
        lines.append("{{- else if eq .Role \"user\" }}" + lit(before) + user_content + lit(after) + reply)
        before, after = self.turns["assistant"]
        lines.append("{{- else if eq .Role \"assistant\" }}" + lit(before) + "{{ .Content }}"
                     + ("{{ if not $last }}" + lit(after) + "{{ end }}" if after else ""))
        lines += ["{{- end }}", "{{- end }}"]
        return "\n".join(lines)


def _same_turns(before: str, after: str, roles=("system", "user", "assistant")) -> dict[str, tuple[str, str]]:
    return {role: (before.format(role=role), after) for role in roles}


FORMATS = (
    ChatFormat("llama3", "<|start_header_id|>", _same_turns("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
               "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    ChatFormat("chatml", "<|im_start|>", _same_turns("<|im_start|>{role}\n", "<|im_end|>\n"),
               "<|im_start|>assistant\n", ("<|im_end|>", "<|im_start|>")),
    ChatFormat("gemma", "<start_of_turn>", {"user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
                                            "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n")},
               "<start_of_turn>model\n", ("<end_of_turn>", "<start_of_turn>"), fold_system="\n\n"),
    ChatFormat("phi3", "<|user|>", _same_turns("<|{role}|>\n", "<|end|>\n"), "<|assistant|>\n",
               ("<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>")),
    ChatFormat("mistral", "[INST]", {"user": ("[INST] ", " [/INST]"), "assistant": ("", "</s>")}, "",
               ("[INST]", "</s>"), fold_system="\n\n"),
)


def chat_format(chat_template: str) -> ChatFormat:
    """The family of a Jinja chat template, by its turn markers; a clear error for any other."""
    for fmt in FORMATS:
        if fmt.marker in chat_template:
            return fmt
    raise QLoraKitError("the model's chat template is none of the families the Ollama export translates (ChatML "
                        "<|im_start|>, Llama 3 <|start_header_id|>, Gemma <start_of_turn>, Phi-3 <|user|>, Mistral "
                        "[INST]): export with --format gguf and write the Modelfile's TEMPLATE by hand "
                        "(https://github.com/ollama/ollama/blob/main/docs/template.md)")


@dataclass
class Modelfile:
    """What the Modelfile says, and how its template compared with the model's own on SAMPLE."""

    family: str | None
    template: str
    system: str | None
    stops: list[str]
    parameters: dict[str, float | int]
    matches_jinja: bool | None = None
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = ["# Written by qlora_kit. Load it with: ollama create NAME -f Modelfile", f"FROM ./{GGUF_NAME}",
                 f"TEMPLATE {_quoted(self.template)}"]
        if self.system:
            lines.append(f"SYSTEM {_quoted(self.system)}")
        lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in self.stops]
        lines += [f"PARAMETER {name} {value}" for name, value in self.parameters.items()]
        return "\n".join(lines) + "\n"

    def summary(self) -> dict:
        return {"family": self.family, "system": self.system, "stops": self.stops, "parameters": self.parameters,
                "template_matches_model": self.matches_jinja, "notes": self.notes}


def modelfile_for(base: Path) -> Modelfile:
    """The Modelfile for the model in the folder `base` (its tokenizer's chat template, config, generation config)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    config = json.loads((base / "config.json").read_text())
    gen_path = base / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return build_modelfile(tokenizer, config, generation)


def build_modelfile(tokenizer, config: dict, generation: dict) -> Modelfile:
    """The Modelfile for a tokenizer (its chat template and special tokens) and a model config."""
    parameters = {"num_ctx": min(int(config.get("max_position_embeddings", DEFAULT_NUM_CTX)), DEFAULT_NUM_CTX)}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if generation.get(key) is not None:
            parameters["repeat_penalty" if key == "repetition_penalty" else key] = generation[key]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if not template:  # a base model, not a chat model: Ollama passes the prompt through as it is
        return Modelfile(None, "{{ .Prompt }}", None, [], parameters,
                         notes=["the model has no chat template: the Modelfile passes prompts through unchanged"])
    fmt = chat_format(template)
    system = default_system(tokenizer, fmt)
    stops = list(dict.fromkeys([*fmt.stops, *([tokenizer.eos_token] if tokenizer.eos_token else [])]))
    modelfile = Modelfile(fmt.name, fmt.go_template(), system, stops, parameters)
    modelfile.matches_jinja, note = compare_with_jinja(tokenizer, fmt, system)
    if note:
        modelfile.notes.append(note)
    return modelfile


def default_system(tokenizer, fmt: ChatFormat) -> str | None:
    """The system prompt the template adds when a conversation has none (SmolLM2 and Qwen2.5 have one)."""
    if "system" not in fmt.turns:
        return None
    before, after = fmt.turns["system"]
    text = _jinja(tokenizer, [{"role": "user", "content": "x"}])
    if not text.startswith(before) or after not in text[len(before):]:
        return None
    return text[len(before):text.index(after, len(before))]


def compare_with_jinja(tokenizer, fmt: ChatFormat, system: str | None) -> tuple[bool | None, str | None]:
    """Render SAMPLE with the model's Jinja template and with the family's format: do they agree?"""
    messages = SAMPLE
    try:
        theirs = _jinja(tokenizer, messages)
    except Exception:  # templates that refuse a system message (Gemma 2, Mistral v0.1)
        messages = SAMPLE[1:]
        try:
            theirs = _jinja(tokenizer, messages)
        except Exception as e:
            return None, f"the model's chat template did not render a sample conversation ({e})"
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    ours = fmt.render(messages)
    if ours == theirs:
        return True, None
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return False, (f"the Modelfile's {fmt.name} template renders a sample conversation differently from the model's "
                   f"own template from character {at}: {theirs[at:at + 60]!r} (model) vs {ours[at:at + 60]!r}; "
                   "edit TEMPLATE in the Modelfile if the difference matters")


def _jinja(tokenizer, messages: list[dict]) -> str:
    """The model's own rendering, without the BOS token a template writes (llama.cpp adds it when it
    tokenises, as the GGUF's add_bos_token says; Ollama's templates leave it out)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    writes_bos = "bos_token" in tokenizer.chat_template
    return text[len(bos):] if writes_bos and bos and text.startswith(bos) else text


def _quoted(text: str) -> str:
    if '"""' in text:
        raise QLoraKitError(f'a Modelfile value cannot hold """: {text[:80]!r}')
    return f'"""{text}"""'


def is_ollama_folder(folder: Path) -> bool:
    """A folder `export_ollama` wrote: its files and nothing else."""
    return (folder.is_dir() and (folder / MODELFILE).is_file() and (folder / "report.json").is_file()
            and all(p.name in OLLAMA_FILES or p.name.startswith(".") for p in folder.iterdir()))


def export_ollama(base: str | Path, adapter: str | Path, out: str | Path, gguf_type: str = "f16",
                  overwrite: bool = False, **gguf_options) -> dict:
    """Merge `adapter` into `base` and write an Ollama folder at `out`: model.gguf, Modelfile, report.json/txt.

    gguf_type and the other options: as for `export_gguf` (q4_k_m needs the qlora_kit[gguf] extra).
    The chat template is translated for the families in FORMATS (an unknown one is an error before any
    merging); report["ollama"] says which, and whether it renders a sample conversation as the model's
    own template does. Written atomically; overwrite replaces only an earlier Ollama export."""
    out = Path(out)
    if out.suffix == ".gguf":
        raise QLoraKitError(f"{out}: an Ollama export is a folder (model.gguf and a Modelfile); give a folder name")
    refuse_overlap(out, {"base model folder": model_location(base), "adapter folder": adapter}, "--out")
    check_replace(out, overwrite, is_ollama_folder, "an Ollama folder qlora_kit wrote (model.gguf, Modelfile, report.json)")
    modelfile = modelfile_for(resolve_model_path(base))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        report = export_gguf(base, adapter, tmp / GGUF_NAME, gguf_type=gguf_type, **gguf_options)
        (tmp / MODELFILE).write_text(modelfile.text())
        report |= {"format": "ollama", "out": str(out / GGUF_NAME), "ollama": modelfile.summary()}
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.txt").write_text(format_gguf_report(report))
    return report
