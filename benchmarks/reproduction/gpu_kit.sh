#!/usr/bin/env bash
# The commonsense study at GPU scale on one lent H100/H200 (no network there): the last call of the
# kit (benchmarks/reproduction/gpu_kit.py explains the parts). Each call carries .kit/manifest.json
# and one .kit/part-K; the calls before the last run `python3 benchmarks/reproduction/gpu_kit.py receive`,
# this one receives its part, unpacks, installs the carried packages into /tmp/gpu_kit/site and runs
# the study: 3 methods × 5 seeds × 800 steps, all held-out examples, the base model, the table and
# `analysis --delta` with routing. Results come back in $OUT (at most 8 files): the table, the
# analysis' tables and summaries, the Fig. 2 views, the timings, the log, and everything in one archive.
#
#   bash benchmarks/reproduction/gpu_kit.sh [--set model.dtype=bfloat16 ...]   # there, after the receive calls
#
# Arguments go to `gpu_kit.py study` (e.g. --set for every point). GPU_KIT_BUDGET_S (default 300):
# the points still running then are ended (table and analysis follow with the finished ones), so
# the command ends inside its device time.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/gpu_kit_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_kit.log") 2>&1
TEE_PID=$!
START=$SECONDS
KIT=/tmp/gpu_kit
echo "gpu_kit: $(date -u), $(nproc) cores, commit $(git log -1 --format=%h 2>/dev/null)"
command -v nvidia-smi >/dev/null && timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/reproduction/gpu_kit.py receive || exit 1
if [ ! -e "$KIT/payload/done" ]; then
    echo "gpu_kit: parts are missing: make the receive call for each part first (on the same warm machine)"
    exit 1
fi
SITE=$KIT/site
if [ ! -d "$SITE" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$KIT"/payload/wheels/*.whl || exit 1
    cp -r "$KIT"/payload/site/. "$SITE"/  # megatron-core, as carried
fi
export PYTHONPATH=$SITE:$PWD
echo "gpu_kit: ready at t=$((SECONDS - START)) s"
python3 -c "import torch, transformers, megatron.core, malora_dist; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', '| transformers', transformers.__version__)"
STUDY=/tmp/gpu_kit_study
rm -rf "$STUDY"
python3 benchmarks/reproduction/gpu_kit.py study --scale gpu --out "$STUDY" --data "$KIT/payload/data/commonsense" \
    --model "$KIT/payload/model.gguf" --budget-s "${GPU_KIT_BUDGET_S:-300}" "$@"
RC=$?
cp "$STUDY/sweep/results.md" "$OUT/results.md" 2>/dev/null
cp "$STUDY/analysis/tables.md" "$OUT/analysis_tables.md" 2>/dev/null
cp "$STUDY/analysis/summary.json" "$OUT/analysis_summary.json" 2>/dev/null
cp "$STUDY/analysis/cca_summary_delta.png" "$OUT/cca_summary_delta.png" 2>/dev/null
cp "$STUDY/kit_timings.json" "$OUT/kit_timings.json" 2>/dev/null
# everything but the adapters' weights and checkpoints, in one archive
tar czf "$OUT/gpu_kit_results.tar.gz" -C "$STUDY" --exclude='*.safetensors' --exclude=checkpoints . 2>/dev/null
echo "gpu_kit: exit $RC at t=$((SECONDS - START)) s"
ls -la "$OUT"
exec >&- 2>&-  # let tee write the last lines of the log before the command returns
wait "$TEE_PID" 2>/dev/null
exit $RC
