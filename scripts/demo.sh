#!/usr/bin/env bash
# The main job: fine-tune SmolLM2-135M-Instruct (4-bit) on chatterbot-corpus trivia, then export a
# merged bf16 model. Sets up .venv first. Extra arguments go to `python -m qlora_kit.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m qlora_kit.demo "$@"
