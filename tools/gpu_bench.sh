#!/usr/bin/env bash
# Throughput and recall check of the fast settings on one GPU, in under 5 minutes of wall time.
#
#   bash tools/gpu_bench.sh                                   # on the GPU machine, from the repository root
#   GPU_BENCH_SMOKE=1 PYTHON=/work/venv/bin/python bash tools/gpu_bench.sh   # tiny CPU sizes: checks the script runs
#
# Steps (each under `timeout`, each may fail or be skipped without stopping the others):
#   prepare  synthetic data (14,112 128-px JPEGs, MIT-States layout), decode-once image cache, random BERT-base
#   bench_a  ComposeAE + BERT-base, batch 32, plain fp32, no cache, 8 workers   (the baseline of this code)
#   bench_b  the same with the fast settings: bf16 autocast, channels_last, image cache (+ a profile of 5 steps)
#   bench_g  (b) + --cuda_graph: the whole training step captured once and replayed
#   bench_h  (g) + --fuse_image_passes (one ResNet pass over query and target images)
#   bench_c  the fast settings at batch 256
#   bench_d  TIRG + LSTM, batch 32, fast settings
#   (e)      evaluation throughput: every bench_* run also times one full evaluation of the test task
#   graph_check  the GPU-only tests of tests/test_fast_paths.py (captured step = eager step), when pytest is there
#   recall_plain_s0, recall_fast_s0: main.py trains 200 iterations and evaluates, plain fp32 vs fast (with
#            --cuda_graph), seed 0
#   recall_plain_s1: plain fp32 with seed 1: the seed-to-seed noise of the recall
#   ceiling  a bare ResNet-18 bf16 + channels_last training step at batch 32 and 256 (the issue's ceiling, here)
#   bench_b_cudnn  (only with GPU_BENCH_EXTRA=1) (b) + torch.backends.cudnn.benchmark
#   bench_f  (only with GPU_BENCH_EXTRA=1) the fast settings + --compile
# Steps run in this order; when the time budget runs short the remaining ones are skipped (and reported).
# Everything it writes goes to "${OUT:-/tmp/gpu_bench_out}": <step>.json, <step>.log, steps.tsv, summary.md.
# The data and the run folders (checkpoints) go to "${GPU_BENCH_DATA:-/tmp/gpu_bench_data}", not into $OUT.
set -u

OUT="${OUT:-/tmp/gpu_bench_out}"
DATA_DIR="${GPU_BENCH_DATA:-/tmp/gpu_bench_data}"
SMOKE="${GPU_BENCH_SMOKE:-0}"
BUDGET="${GPU_BENCH_BUDGET:-270}"   # seconds of wall time for all steps (+ <= 10 s kill grace + the report)
mkdir -p "$OUT" "$DATA_DIR" "$OUT/runs"
OUT=$(cd "$OUT" && pwd)
DATA_DIR=$(cd "$DATA_DIR" && pwd)
REPO=$(pwd)
: > "$OUT/steps.tsv"
rm -rf "$OUT"/runs/x_* "$OUT"/profile_b && rm -f "$OUT"/bench_*.json "$OUT"/ceiling.json "$OUT"/prepare.json  # no stale results
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + BUDGET))

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PY="$candidate"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_bench.sh: no python with torch found; set PYTHON=/path/to/python" >&2
  exit 2
fi

if [ "$SMOKE" = "1" ]; then
  SIZE=cpu; DEVICE=auto; WORKERS=2
  IT_A="--iters 2 --warmup 1"; IT_B="--iters 3 --warmup 1"; IT_C="--iters 2 --warmup 1"; IT_D="--iters 3 --warmup 1"
  IT_G="--iters 3 --warmup 4"
  BIG_BATCH=32; PROFILE_STEPS=2; RECALL_ITERS=4; RECALL_SIZE=32; RECALL_WORKERS=2
  T_PREP=200; T_BENCH=150; T_RECALL=200; RECALL_MIN=20; CEILING="--image_size 32 --batch_size 8 --iters 2 --warmup 1"
else
  SIZE=full; DEVICE=cuda; WORKERS=8
  # warm-up > the loader's prefetch depth (8 workers x 2 batches), so that no prefetched batch is timed
  IT_A="--iters 60 --warmup 32"; IT_B="--iters 200 --warmup 40"; IT_C="--iters 40 --warmup 24"
  IT_D="--iters 200 --warmup 40"; IT_G="--iters 300 --warmup 40"
  BIG_BATCH=256; PROFILE_STEPS=5; RECALL_ITERS=200; RECALL_SIZE=224; RECALL_WORKERS=8
  T_PREP=150; T_BENCH=90; T_RECALL=90; RECALL_MIN=40; CEILING=""
fi
FAST="--amp True --channels_last True --image_cache auto --workers $WORKERS"
COMMON="--size $SIZE --device $DEVICE --data_dir $DATA_DIR --bert_model random-bert-base"

# run_step NAME MAX_SECONDS MIN_SECONDS CMD...: runs CMD under timeout (at most what is left of the budget),
# stdout to $OUT/NAME.out, stderr to $OUT/NAME.log; records "NAME<TAB>status<TAB>seconds" in steps.tsv.
run_step() {
  local name=$1 max=$2 min=$3
  shift 3
  local now left limit t0 rc status
  now=$(date +%s)
  left=$((DEADLINE - now))
  if [ "$left" -lt "$min" ]; then
    printf '%s\tskipped (time budget: %ss left, needs %ss)\t0\n' "$name" "$left" "$min" >> "$OUT/steps.tsv"
    echo "[gpu_bench] $name: skipped, ${left}s left" >&2
    return 1
  fi
  limit=$max
  [ "$left" -lt "$limit" ] && limit=$left
  echo "[gpu_bench] $name (limit ${limit}s): $*" >&2
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  rc=$?
  if [ "$rc" -eq 0 ]; then status=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="timeout after ${limit}s"
  else status="failed (rc=$rc; see $name.log)"
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
  echo "[gpu_bench] $name: $status in $(( $(date +%s) - t0 ))s" >&2
  [ "$rc" -ne 0 ] && tail -n 5 "$OUT/$name.log" >&2
  return "$rc"
}

json_get() {  # json_get FILE KEY1 KEY2 ...: prints d[KEY1][KEY2]...
  "$PY" - "$@" <<'EOF' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
for k in sys.argv[2:]:
    d = d[k]
print(d)
EOF
}

# -- environment
run_step env 30 5 bash -c "nvidia-smi 2>&1 || echo 'no nvidia-smi'; \"$PY\" -c 'import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), \"transformers\", transformers.__version__)'; nproc; free -g"
cat "$OUT/env.out" >&2

# -- data, image cache, random BERT-base
run_step prepare "$T_PREP" 20 "$PY" benchmark.py $COMMON $FAST --prepare_only --output "$OUT/prepare.json"
DATA_PATH=$(json_get "$OUT/prepare.json" data path)
BERT_PATH=$(json_get "$OUT/prepare.json" settings bert_path)

# -- throughput
run_step bench_a "$T_BENCH" 25 "$PY" benchmark.py $COMMON --workers "$WORKERS" $IT_A --output "$OUT/bench_a.json"
run_step bench_b "$T_BENCH" 20 "$PY" benchmark.py $COMMON $FAST $IT_B --profile "$OUT/profile_b" \
  --profile_steps "$PROFILE_STEPS" --output "$OUT/bench_b.json"
run_step bench_g "$T_BENCH" 20 "$PY" benchmark.py $COMMON $FAST --cuda_graph True $IT_G --output "$OUT/bench_g.json"
run_step bench_h "$T_BENCH" 20 "$PY" benchmark.py $COMMON $FAST --cuda_graph True --fuse_image_passes True $IT_G \
  --output "$OUT/bench_h.json"
run_step bench_c "$T_BENCH" 20 "$PY" benchmark.py $COMMON $FAST --batch_size "$BIG_BATCH" $IT_C \
  --output "$OUT/bench_c.json"
run_step bench_d "$T_BENCH" 20 "$PY" benchmark.py $COMMON $FAST --model tirg --text lstm $IT_D \
  --output "$OUT/bench_d.json"

# -- the captured step against the eager one (tests skip these without a GPU)
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  run_step graph_check 120 20 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_paths.py -k "graph or amp"
else
  printf 'graph_check\tskipped (no pytest in this python)\t0\n' >> "$OUT/steps.tsv"
fi

# -- recall: plain fp32 vs fast settings, same seed; a second plain seed measures the seed-to-seed noise
recall_run() {  # recall_run TAG SEED [extra main.py flags]
  local tag=$1 seed=$2
  shift 2
  if [ -z "$DATA_PATH" ] || [ -z "$BERT_PATH" ]; then
    printf '%s\tskipped (prepare failed)\t0\n' "$tag" >> "$OUT/steps.tsv"
    return 1
  fi
  run_step "$tag" "$T_RECALL" "$RECALL_MIN" "$PY" main.py --dataset mitstates --dataset_path "$DATA_PATH" --model composeAE \
    --use_bert True --bert_model "$BERT_PATH" --loss batch_based_classification --image_size "$RECALL_SIZE" \
    --image_weights none --num_iters "$RECALL_ITERS" --learning_rate_decay_frequency 9999999 --batch_size 32 \
    --weight_decay 5e-5 --loader_num_workers "$RECALL_WORKERS" --eval_every "$RECALL_ITERS" \
    --save_every "$RECALL_ITERS" --train_eval_queries 500 --log_dir "$DATA_DIR/runs" --comment "_$tag" \
    --device "$DEVICE" --seed "$seed" "$@"
  local metrics
  metrics=$(ls -td "$DATA_DIR"/runs/*_"$tag" "$DATA_DIR"/runs/*_"$tag"_[0-9]* 2>/dev/null | head -n 1)
  metrics="${metrics:+$metrics/metrics.json}"
  [ -n "$metrics" ] && [ ! -f "$metrics" ] && metrics=""
  if [ -n "$metrics" ]; then
    mkdir -p "$OUT/runs/x_$tag"
    cp "$metrics" "$OUT/runs/x_$tag/metrics.json"
  fi
}
recall_run recall_plain_s0 0
recall_run recall_fast_s0 0 --amp True --channels_last True --image_cache "$DATA_DIR/cache" --eval_batch_size 256 \
  --cuda_graph "$([ "$SMOKE" = "1" ] && echo False || echo True)"

recall_run recall_plain_s1 1
run_step ceiling 60 15 "$PY" benchmark.py --ceiling --device "$DEVICE" $CEILING --output "$OUT/ceiling.json"

if [ "${GPU_BENCH_EXTRA:-0}" = "1" ]; then
  run_step bench_b_cudnn "$T_BENCH" 20 "$PY" benchmark.py $COMMON $FAST $IT_B --cudnn_benchmark True \
    --output "$OUT/bench_b_cudnn.json"
  run_step bench_f "$T_BENCH" 60 "$PY" benchmark.py $COMMON $FAST --compile True $IT_B --output "$OUT/bench_f.json"
fi

# -- report
"$PY" benchmark.py --report "$OUT" > "$OUT/summary.md" 2> "$OUT/report.log" || echo "report failed: see report.log" >&2
echo "" >> "$OUT/summary.md"
echo "Total wall time: $(( $(date +%s) - START )) s (budget ${BUDGET} s). Files: $OUT" >> "$OUT/summary.md"
cat "$OUT/summary.md"
exit 0
