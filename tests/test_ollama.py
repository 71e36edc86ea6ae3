"""Ollama export: a Modelfile per chat-template family, whose Go template renders a conversation as the
model's own Jinja template does (checked with a small Go-template renderer written here), and the folder."""

import json
import re

import pytest

from qlora_kit import QLoraKitError, export_ollama
from qlora_kit.cli import main as cli_main
from qlora_kit.export.ollama import build_modelfile, chat_format
from test_export import trained_adapter
from tiny import make_tokenizer

QUIET = dict(progress=False)
# Chat templates as the families ship them (Qwen2.5-style ChatML with a default system prompt, Meta
# Llama 3, Gemma 3, Phi-3, Mistral v0.1 with its "</s>" written out).
TEMPLATES = {
    "chatml": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
               "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "gemma": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = "
              "messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}"
              "{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
              "{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
              "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
              "(first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "phi3": ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] "
             "+ '<|end|>\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
             "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
             "{{ eos_token }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
                "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + '</s>' }}{% else %}"
                "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]


# ---------------------------------------------------------------- a Go-template renderer for what we emit

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def go_render(template: str, messages: list[dict]) -> str:
    """Render the subset of Go's text/template that the Modelfile uses: trim markers, string literals,
    .Role/.Content, variables (:= and =), if/else if/else, range over .Messages, eq/not/len/slice."""
    parts, pos = [], 0
    for m in _ACTION.finditer(template):
        parts += [("text", template[pos:m.start()]), ("action", m.group(2), m.group(1), m.group(3))]
        pos = m.end()
    parts.append(("text", template[pos:]))
    for i, part in enumerate(parts):  # trim markers eat the whitespace beside them
        if part[0] == "action":
            if part[2]:
                parts[i - 1] = ("text", parts[i - 1][1].rstrip())
            if part[3]:
                parts[i + 1] = ("text", parts[i + 1][1].lstrip())
    tree, rest = _parse(parts, 0)
    assert rest == len(parts)
    out = []
    _run(tree, {"$": {"Messages": messages}}, {"Messages": messages}, out)
    return "".join(out)


def _parse(parts, i, stop=("end",)):
    nodes = []
    while i < len(parts):
        part = parts[i]
        if part[0] == "text":
            nodes.append(("text", part[1]))
            i += 1
            continue
        action = part[1]
        if action == "end" or action == "else" or action.startswith("else if "):
            return nodes, i
        if action.startswith("if "):
            branches, i = [], i
            cond = action[3:]
            while True:
                body, i = _parse(parts, i + 1)
                branches.append((cond, body))
                action = parts[i][1]
                if action == "end":
                    break
                cond = action[8:] if action.startswith("else if ") else "true"
            nodes.append(("if", branches))
            i += 1
        elif action.startswith("range "):
            body, i = _parse(parts, i + 1)
            nodes.append(("range", action, body))
            i += 1
        else:
            nodes.append(("action", action))
            i += 1
    return nodes, i


def _run(nodes, env, dot, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond == "true" or _eval(cond, env, dot):
                    _run(body, env, dot, out)
                    break
        elif node[0] == "range":
            index_var = re.match(r"range (\$\w+), \$_ := \.Messages$", node[1]).group(1)
            for k, message in enumerate(dot["Messages"]):
                env[index_var] = k
                _run(node[2], env, message, out)
        else:
            m = re.match(r"(\$\w+) :?= (.*)$", node[1])
            if m:
                env[m.group(1)] = _eval(m.group(2), env, dot)
            else:
                out.append(str(_eval(node[1], env, dot)))


def _eval(expr, env, dot):
    tokens = re.findall(r'"(?:\\.|[^"\\])*"|\(|\)|[^\s()]+', expr)
    value, rest = _expr(tokens, env, dot)
    assert not rest, expr
    return value


def _expr(tokens, env, dot):
    """A pipeline: a function applied to its arguments, or one operand."""
    head, *rest = tokens
    functions = {"eq": lambda a, b: a == b, "not": lambda a: not a, "len": len, "slice": lambda s, k: s[k:]}
    if head in functions:
        args = []
        while rest and rest[0] != ")":
            arg, rest = _operand(rest, env, dot)
            args.append(arg)
        return functions[head](*args), rest
    return _operand(tokens, env, dot)


def _operand(tokens, env, dot):
    head, *rest = tokens
    if head == "(":
        value, rest = _expr(rest, env, dot)
        assert rest[0] == ")"
        return value, rest[1:]
    if head.startswith('"'):
        return json.loads(head), rest
    if head.isdigit():
        return int(head), rest
    if head.startswith("$."):
        return env["$"][head[2:]], rest
    if head.startswith("$"):
        return env[head], rest
    if head.startswith("."):
        return dot[head[1:].lower()], rest
    raise AssertionError(f"unknown operand {head}")


# ---------------------------------------------------------------- the families

def tokenizer_with(template):
    tok = make_tokenizer()
    tok.chat_template = template
    return tok


def jinja(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # llama.cpp adds BOS itself when it tokenises: a template that writes it is compared without it
    return text.removeprefix(tok.bos_token) if "bos_token" in tok.chat_template else text


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_go_template_renders_the_conversation_as_the_jinja_template_does(family):
    tok = tokenizer_with(TEMPLATES[family])
    modelfile = build_modelfile(tok, {"max_position_embeddings": 32768}, {"temperature": 0.6})
    assert modelfile.family == family and modelfile.matches_jinja is True and modelfile.notes == []
    assert set(chat_format(TEMPLATES[family]).stops) <= set(modelfile.stops)
    assert modelfile.parameters == {"num_ctx": 4096, "temperature": 0.6}
    chat = CHAT[1:] if family == "mistral" else CHAT  # Mistral v0.1's template refuses a system message
    for turns in (chat[:-2], chat):  # one question; a multi-turn conversation
        assert go_render(modelfile.template, turns) == jinja(tok, turns)
    if family == "chatml":  # the template's default system prompt goes to SYSTEM; Ollama sends it as a message
        assert modelfile.system == "You are a helpful assistant."
        with_default = [{"role": "system", "content": modelfile.system}, CHAT[1]]
        assert go_render(modelfile.template, with_default) == jinja(tok, CHAT[1:2])
    else:
        assert modelfile.system is None


def test_modelfile_text():
    modelfile = build_modelfile(tokenizer_with(TEMPLATES["chatml"]), {"max_position_embeddings": 2048}, {})
    text = modelfile.text()
    assert "FROM ./model.gguf\n" in text and 'SYSTEM """You are a helpful assistant."""' in text
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\n' in text and "PARAMETER num_ctx 2048" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    assert template == modelfile.template and '{{ "<|im_start|>assistant\\n" }}' in template


def test_a_template_that_differs_is_reported_and_an_unknown_one_refused():
    # Llama 3.1 puts a date preamble into every system turn; the Llama 3 Go template does not
    dated = TEMPLATES["llama3"].replace("message['content'] | trim", "('Today Date: 26 Jul 2024\n\n' if "
                                        "message['role'] == 'system' else '') + message['content'] | trim")
    modelfile = build_modelfile(tokenizer_with(dated), {}, {})
    assert modelfile.family == "llama3" and modelfile.matches_jinja is False
    assert "differently" in modelfile.notes[0] and "Today Date" in modelfile.notes[0]
    with pytest.raises(QLoraKitError, match="none of the families .* write the Modelfile's TEMPLATE by hand"):
        build_modelfile(tokenizer_with("{% for m in messages %}### {{ m['content'] }}\n{% endfor %}"), {}, {})
    plain = build_modelfile(tokenizer_with(None), {}, {})
    assert plain.template == "{{ .Prompt }}" and plain.family is None and "no chat template" in plain.notes[0]


# ---------------------------------------------------------------- the folder

def test_ollama_folder(tiny_dirs, tmp_path, capsys):
    base = tiny_dirs("llama-tied")
    trained_adapter(base, tmp_path / "a")
    report = export_ollama(base, tmp_path / "a", tmp_path / "ollama", verify=False, eval_file=False, **QUIET)
    assert sorted(p.name for p in (tmp_path / "ollama").iterdir()) == ["Modelfile", "model.gguf", "report.json",
                                                                     "report.txt"]
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    assert text.startswith("# Written by qlora_kit") and "FROM ./model.gguf" in text and "PARAMETER num_ctx 256" in text
    assert report["ollama"]["family"] == "chatml" and report["ollama"]["template_matches_model"] is True
    assert json.loads((tmp_path / "ollama" / "report.json").read_text())["ollama"]["stops"] == ["<|im_end|>",
                                                                                                 "<|im_start|>"]
    assert "Modelfile:  chatml template, renders a sample conversation" in (tmp_path / "ollama" / "report.txt").read_text()

    args = ["export", "--base", str(base), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "ollama"),
            "--format", "ollama", "--no-verify", "--no-eval"]
    assert cli_main(args) == 2 and "already exists" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    assert "ollama create NAME -f" in capsys.readouterr().out
    with pytest.raises(QLoraKitError, match="is a folder"):
        export_ollama(base, tmp_path / "a", tmp_path / "m.gguf", **QUIET)


@pytest.mark.slow
def test_smollm2_modelfile(smollm2_dir):
    """The real ChatML template with its default system prompt, as SmolLM2-135M-Instruct ships it."""
    from qlora_kit.export.ollama import modelfile_for
    from transformers import AutoTokenizer

    modelfile = modelfile_for(smollm2_dir)
    assert modelfile.family == "chatml" and modelfile.matches_jinja is True
    assert modelfile.system.startswith("You are a helpful AI assistant named SmolLM")
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    as_ollama_sends_it = [{"role": "system", "content": modelfile.system}, *question]
    assert go_render(modelfile.template, as_ollama_sends_it) == jinja(tok, question)
