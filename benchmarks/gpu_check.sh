#!/usr/bin/env bash
# One call on a GPU machine (H100/H200, no network): malora_dist on CUDA, checked and measured in
# ≤ 7 min. Needs the carried folder .whl (made by benchmarks/gpu_prepare.sh): the wheels that the
# machine lacks (megatron-core; transformers of the version this repo is tested with) and the
# SmolLM2 tokenizer as an HF directory (the GGUF and the gguf package are not there).
#
#   bash benchmarks/gpu_check.sh                              # there; results in $OUT
#   GPU_CHECK_LOCAL=1 OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh   # here: CPU, tiny sizes, .venv
#
# Steps (each with its own timeout, all within a 390 s budget; a failed step does not stop the rest):
#   info        nvidia-smi, versions
#   parity      benchmarks/gpu_parity.py: AdapterLinear on cuda vs the CPU (fp64/fp32 fail the run; bf16 reported);
#               adapter.kernel auto = the fused Functions wherever they run: the whole layer (dense local experts)
#               and, for the ``sparse`` cases, the routing and grouped-experts Functions that experts split
#               over ranks run around their exchange (grouped_mm, bf16 r̄ padded to 16 numbers) — the
#               expert-parallel kernels at ep=1 with the grouped path forced
#   parity_ref  the same cases with adapter.kernel=reference (the parts)
#   layer_ops   benchmarks/layer_ops.py on cuda, bf16: work ops and CUDA kernels per layer fwd+bwd, fused vs reference,
#               with all experts local and on one rank of experts split over 2 (the exchange's local steps)
# Not here: the tensor-parallel kernels and the all-to-all itself (they need two GPUs: NCCL takes one
# device per rank); tests/test_fused_tensor_parallel.py holds them to the reference parts on gloo.
#   train       launch/train.py under torch.distributed.run (torchrun), configs/tiny.yaml: NCCL + cuda,
#               checkpoints at steps 4 and 8 (torch.distributed.checkpoint), adapter export
#   resume      the same run resumed from step_8 to step 12 (checkpoint load, fused AdamW state on cuda)
#   layer_big   benchmarks/layer_speed.py n=m=4096, 16384 tokens, bfloat16 (float32 if bfloat16 fails):
#               every method fused and reference (-ref), time, saved-for-backward MB
#   layer_issue benchmarks/layer_speed.py n=m=2048, 2048 tokens, float32 (the README's shape)
#   throughput  benchmarks/throughput.py --parts training --layouts single on a random 1.0B LLaMA
#               (benchmarks/models/llama_1b.json) in bfloat16, 16 × 1024 tokens per step, 2 warm-up + 5
#               timed rounds: in 4 micro-batches (throughput, LoRA/MoLoRA/MALoRA fused and -ref: peak GPU
#               memory per variant), and in one (throughput16, fused only)
# Exit status 1 if parity, train or resume failed, else 0. Files in $OUT (≤ 10): gpu_check.log, parity.json,
# parity_reference.json, ops_per_layer.json, layer_big_<dtype>.json, layer_issue_float32.json,
# throughput_gpu.json, throughput_gpu_micro16.json, train_metrics.jsonl, train_run_info.json.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
LOCAL=${GPU_CHECK_LOCAL:-0}
if [ "$LOCAL" = 1 ]; then
    PY=${PY:-.venv/bin/python}
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
    PY=python3
fi
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
TOKENIZER=.whl/smollm2_tokenizer
WORK=/tmp/gpu_check_work
rm -rf "$WORK" && mkdir -p "$WORK"
BUDGET=${GPU_CHECK_BUDGET_S:-390}
START=$SECONDS
SUMMARY=()

# step NAME LIMIT_S CMD...: run CMD under `timeout` (capped by what is left of the budget), log rc and time.
step() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "=== [$name] skipped: budget spent"
        SUMMARY+=("$(printf '%-12s skipped (budget spent)' "$name")")
        return 124
    fi
    echo "=== [$name] $(date +%T) (t=$((SECONDS - START)) s, timeout ${limit} s): $*"
    t0=$SECONDS
    timeout -k 5 "$limit" "$@"
    rc=$?
    echo "=== [$name] rc=$rc in $((SECONDS - t0)) s"
    SUMMARY+=("$(printf '%-12s rc=%-3s %4d s' "$name" "$rc" "$((SECONDS - t0))")")
    return $rc
}

if [ "$LOCAL" = 1 ]; then  # CPU, tiny sizes: checks the commands, not the GPU
    DEV=cpu
    BIG=(--n 128 --m 128 --tokens 256 --repeats 2 --warmup 1 --threads 1)
    ISSUE=(--n 128 --m 128 --tokens 128 --repeats 2 --warmup 1 --threads 1)
    "$PY" - "$WORK/model.json" <<'EOF'
import json, sys
config = json.load(open("benchmarks/models/llama_1b.json"))
config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
json.dump(config, open(sys.argv[1], "w"))
EOF
    MODEL=$WORK/model.json
    TP=(--seq-len 64 --global-batch 4 --micro-batch 2 --warmup 1 --repeats 2 --threads 1 --data-limit 64)
    MICRO_ALL=4
    THREADS=1
    OPS=(--n 64 --m 64 --tokens 32)
    OPS_DTYPE=float32
else
    DEV=cuda
    BIG=(--n 4096 --m 4096 --tokens 16384 --repeats 20 --warmup 5)
    ISSUE=(--n 2048 --m 2048 --tokens 2048 --repeats 20 --warmup 5)
    MODEL=benchmarks/models/llama_1b.json
    TP=(--seq-len 1024 --global-batch 16 --micro-batch 4 --warmup 2 --repeats 5 --threads 8 --data-limit 2000)
    MICRO_ALL=16
    THREADS=8
    OPS=(--n 4096 --m 4096 --tokens 4096)
    OPS_DTYPE=bfloat16
fi
# the reference parts of the three paper methods next to their fused defaults, in the 1B steps
REF_METHODS=(--method lora-r64-ref:method=lora,rank=64,kernel=reference
             --method molora-r8-ref:method=molora,rank=8,num_experts=8,top_k=2,kernel=reference
             --method malora-d32-r12-ref:method=malora,rank=8,num_experts=8,top_k=2,lam=0.5,kernel=reference)

# ---- info ---------------------------------------------------------------------------------------
echo "gpu_check: $(date -u), $(uname -m), $(nproc) cores, local=$LOCAL, out=$OUT, budget ${BUDGET} s"
git log -1 --format='commit %H %s' 2>/dev/null; git status --short 2>/dev/null | head -20
command -v nvidia-smi >/dev/null && timeout 15 nvidia-smi
step info 40 "$PY" - <<'EOF'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| available", torch.cuda.is_available(), "| nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
import malora_dist, transformers, megatron.core  # malora_dist first: it silences megatron's TE/Apex warning
for name in ("transformers", "megatron-core", "huggingface-hub", "tokenizers", "safetensors", "accelerate", "numpy",
             "nvidia-ml-py", "peft", "datasets", "gguf"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} missing")
print("transformers from", transformers.__file__, "| megatron from", megatron.core.__file__)
EOF

# ---- a. parity on the device --------------------------------------------------------------------
step parity 50 "$PY" benchmarks/gpu_parity.py --device "$DEV" --threads "$THREADS" --output "$OUT/parity.json"
PARITY_RC=$?
step parity_ref 45 "$PY" benchmarks/gpu_parity.py --device "$DEV" --threads "$THREADS" --kernel reference --no-bf16 \
    --output "$OUT/parity_reference.json"
PARITY_REF_RC=$?

# ---- launches per adapted linear: fused vs reference --------------------------------------------
step layer_ops 30 "$PY" benchmarks/layer_ops.py --device "$DEV" --dtype "$OPS_DTYPE" "${OPS[@]}" --output "$OUT/ops_per_layer.json"

# ---- d. a real training run under torchrun (NCCL + cuda) ----------------------------------------
TRAIN_DIR=$WORK/train
step train 50 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 launch/train.py --config configs/tiny.yaml \
    --set "model.tokenizer=$TOKENIZER" --set "train.output_dir=$TRAIN_DIR" --set checkpoint.resume=never
TRAIN_RC=$?
# resume from step_8 (torch.distributed.checkpoint load, optimizer state on the device) and train to step 12
step resume 40 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 launch/train.py --config configs/tiny.yaml \
    --set "model.tokenizer=$TOKENIZER" --set "train.output_dir=$TRAIN_DIR" --set checkpoint.resume=auto --set train.steps=12
RESUME_RC=$?
cp "$TRAIN_DIR/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null || echo "no metrics.jsonl in $TRAIN_DIR"
cp "$TRAIN_DIR/run_info.json" "$OUT/train_run_info.json" 2>/dev/null || echo "no run_info.json in $TRAIN_DIR"
ls "$TRAIN_DIR" "$TRAIN_DIR/checkpoints" "$TRAIN_DIR/adapter" 2>/dev/null

# ---- b. one layer -------------------------------------------------------------------------------
if ! step layer_big 45 "$PY" benchmarks/layer_speed.py --device "$DEV" --dtype bfloat16 "${BIG[@]}" --output "$OUT/layer_big_bfloat16.json"; then
    echo "layer_big: bfloat16 failed; the same shape in float32"
    rm -f "$OUT/layer_big_bfloat16.json"
    step layer_big32 40 "$PY" benchmarks/layer_speed.py --device "$DEV" --dtype float32 "${BIG[@]}" --output "$OUT/layer_big_float32.json"
fi
step layer_issue 25 "$PY" benchmarks/layer_speed.py --device "$DEV" --dtype float32 "${ISSUE[@]}" --output "$OUT/layer_issue_float32.json"

# ---- c. training throughput on a random 1.0B LLaMA, bfloat16 -----------------------------------
# 16 × 1024 tokens per step (the paper's 16,384), in 4 micro-batches and in one.
step throughput 150 "$PY" benchmarks/throughput.py --parts training --layouts single --model "$MODEL" --tokenizer "$TOKENIZER" \
    --dtype bfloat16 "${TP[@]}" "${REF_METHODS[@]}" --memory none --output-dir "$WORK/throughput" --name throughput_gpu
cp "$WORK/throughput/throughput_gpu.json" "$OUT/throughput_gpu.json" 2>/dev/null || echo "no throughput_gpu.json"
step throughput16 80 "$PY" benchmarks/throughput.py --parts training --layouts single --model "$MODEL" --tokenizer "$TOKENIZER" \
    --dtype bfloat16 "${TP[@]}" --micro-batch "$MICRO_ALL" --memory none --output-dir "$WORK/throughput" --name throughput_gpu_micro16
cp "$WORK/throughput/throughput_gpu_micro16.json" "$OUT/throughput_gpu_micro16.json" 2>/dev/null || echo "no throughput_gpu_micro16.json"

# ---- summary ------------------------------------------------------------------------------------
echo
echo "=== summary ($((SECONDS - START)) s of ${BUDGET} s)"
printf '  %s\n' "${SUMMARY[@]}"
timeout 15 "$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
for p in (load("parity.json"), load("parity_reference.json")):
  if p:
    bad = [f"{r['case']}/{r['dtype']}" for r in p["rows"] if not r.get("reported_only") and not r["ok"]]
    bf = [r for r in p["rows"] if r["dtype"] == "bfloat16" and "worst_rel_vs_fp64" in r]
    mixed = sorted({r.get("error", "ok") for r in p["rows"] if r["dtype"] == "mixed"})
    print(f"parity ({p.get('meta', {}).get('kernel', 'auto')}): {p['checked'] - p['failures']}/{p['checked']} ok{' FAILED: ' + ', '.join(bad[:8]) if bad else ''}; "
          f"bf16 worst rel vs fp64 {max((r['worst_rel_vs_fp64'] for r in bf), default=float('nan')):.2e}; mixed bf16 base/fp32 adapters: {mixed}")
ops = load("ops_per_layer.json")
if ops:
    s = ops["shape"]
    print(f"ops per layer fwd+bwd (n={s['n']} m={s['m']} tokens={s['tokens']} {s['dtype']}):")
    for k, v in ops["results"].items():
        print(f"  {k:26s} work ops {v['work_ops']:4d}  ÷ LoRA {v['ops_over_lora_fused']:.2f}  CUDA kernels {v.get('cuda_kernels')}")
for name in sorted(glob.glob(os.path.join(out, "layer_*.json"))):
    r = json.load(open(name))
    s = r["shape"]
    print(f"{os.path.basename(name)}: n={s['n']} m={s['m']} tokens={s['tokens']} {s['dtype']} on {r.get('device_name') or r['device']}")
    for k, v in r["results"].items():
        print(f"  {k:24s} fwd+bwd {v['fwd_bwd_ms']['median']:8.3f} ms  ×base {v['ratio_to_base']:.3f}  step {v['step_ms']['median']:8.3f} ms")
for t in (load("throughput_gpu.json"), load("throughput_gpu_micro16.json")):
  if t and "training" in t:
      tr = t["training"]
      print(f"throughput: seq {tr['seq_len']} × batch {tr['global_batch_size']} (micro {tr['micro_batch_size']}), dtype {tr['model'].get('dtype')}")
      for layout, data in tr["layouts"].items():
          for k, v in data["variants"].items():
              step = v.get("step_s") or {}
              over = (v.get("step_over_base") or {}).get("median")
              print(f"  [{layout}] {k:16s} step {step.get('median', float('nan')):.3f} s ({step.get('min', float('nan')):.3f}-{step.get('max', float('nan')):.3f})"
                    f"  ×base {over if over is None else round(over, 3)}  tokens/s {(v.get('tokens_per_s') or {}).get('median', float('nan')):.0f}"
                    f"  fwd/bwd/opt {[round((v.get(p) or {}).get('median', float('nan')), 3) for p in ('forward_s', 'backward_s', 'optimizer_s')]}"
                    f"  gpu MB {v.get('gpu_max_allocated_mb')}")
          print(f"  [{layout}] setup {data.get('setup_s', float('nan')):.1f} s, device {data.get('device')}")
m = os.path.join(out, "train_metrics.jsonl")
if os.path.exists(m):
    rows = [json.loads(l) for l in open(m) if l.strip()]
    if rows:
        last = rows[-1]
        keep = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in last.items()
                if "gpu" in k or "mem" in k or k.startswith("time_") or k in ("tokens_per_s", "step")}
        print(f"train: {len(rows)} rows (steps {[r.get('step') for r in rows]}), loss {rows[0].get('loss'):.4f} -> {last.get('loss'):.4f}; last row {keep}")
EOF
ls -la "$OUT"
RC=$(( PARITY_RC != 0 || PARITY_REF_RC != 0 || TRAIN_RC != 0 || RESUME_RC != 0 ))
echo "gpu_check: exit $RC (1 = parity, train or resume failed; the measurements' steps never fail the run)"
exec >&- 2>&-  # let tee write the last lines of the log before the command returns
wait "$TEE_PID" 2>/dev/null
exit $RC
