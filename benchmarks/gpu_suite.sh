#!/usr/bin/env bash
# One prepared GPU check (issue 18), under 8 minutes on one H100/H200:
#   1. conch_v1 bf16 extraction patches/s (random weights in CONCH's key layout: speed only), encoder alone
#      bf16 vs fp32, and `slidechat extract-features` end to end, bf16 (and --no-amp fp32, run last);
#   2. one stage-2 step (LoRA, configs/slidechat/stage_2_lora.py) with a Qwen2.5-7B-shaped LLM at 10k
#      patches: s/step and peak GPU memory, label-logits path vs the stock full-logits call (baseline);
#   3. `slidechat infer` examples/s (benchmarks/infer_throughput.py, the real inference path) with a
#      Qwen2.5-VL-7B-shaped random model, batch 8 vs batch 1 (baseline).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]                       # default OUT_DIR: work_dirs/gpu_suite
#   GPU_SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh [OUT_DIR]   # same steps, tiny sizes, CPU, ~2 min
#
# GPU_SUITE_BUDGET_S (default 470) caps the whole run: each step gets at most the time left.
# Writes OUT_DIR/gpu_suite.md and gpu_suite.json (and one .log per step). A failing step is recorded as
# failed (with its exit status) and the suite goes on; the exit status is the number of failed steps.
# PYTHON (default: python) must be the project's environment. Each step has its own time limit.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
OUT="${1:-work_dirs/gpu_suite}"
PY="${PYTHON:-python}"
DRY="${GPU_SUITE_DRY_RUN:-0}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T0=$(date +%s)
FAILED=0
declare -A STATUS

if [ "$DRY" = "1" ]; then
  DEVICE=cpu
  SLIDE=(--width 672 --height 448 --n-slides 1)       # a few patches (conch_v1 on a CPU: ~1 s each)
  ENC=(--batch 1 --iters 1)
  STEP=(--tiny --lora --compare-at 64)
  VL=(--vocab-size 1000 --hidden-size 64 --num-layers 2 --num-heads 4 --num-kv-heads 2
      --intermediate-size 128 --vision-depth 2 --vision-embed-dim 64 --vision-heads 4)
  INFER=(--rows 4 --max-new-tokens 4 --batch-sizes 1 4 --device cpu --dtype fp32)
else
  DEVICE=cuda
  SLIDE=(--width 20000 --height 15000 --n-slides 1)   # 20x: a few thousand tissue patches
  ENC=(--batch 256 --iters 10)
  STEP=(--llm qwen2.5-7b --lora --device cuda --patches 10000 --compare-at 10000)
  # Qwen2.5-VL-7B-Instruct's config.json: text 3584 wide, 28 layers, 28/4 heads, MLP 18944, vocab 152064;
  # vision tower 32 blocks, 1280 wide, 16 heads
  VL=(--vocab-size 152064 --hidden-size 3584 --num-layers 28 --num-heads 28 --num-kv-heads 4
      --intermediate-size 18944 --vision-depth 32 --vision-embed-dim 1280 --vision-heads 16)
  INFER=(--rows 32 --max-new-tokens 32 --batch-sizes 1 8 --device cuda --dtype bf16)
fi

# the whole suite stays within GPU_SUITE_BUDGET_S (default 470 s): a step gets at most what is left
BUDGET="${GPU_SUITE_BUDGET_S:-470}"

# run NAME LIMIT_S CMD...: its output to NAME.log, its status into STATUS[NAME]
run() {
  local name="$1" limit="$2"
  shift 2
  local t=$(date +%s)
  local left=$(( BUDGET - (t - T0) ))
  if [ "$left" -lt 20 ]; then
    skip "$name" "suite time budget (${BUDGET} s) spent"; FAILED=$((FAILED + 1)); return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[gpu_suite] $name ..." >&2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  if [ $rc -eq 0 ]; then STATUS[$name]="ok (${dt} s)"; else
    STATUS[$name]="failed: exit $rc after ${dt} s$([ $rc -eq 124 ] && echo ', time limit') (see $name.log)"
    FAILED=$((FAILED + 1)); fi
  echo "[gpu_suite] $name: ${STATUS[$name]}" >&2
  return $rc
}
skip() { STATUS[$1]="skipped: $2"; echo "[gpu_suite] $1: skipped: $2" >&2; }

# extract MODE: `slidechat extract-features` with conch_v1 on the synthetic slide, timings read from the H5
extract() {
  local mode="$1" amp=()
  [ "$mode" = fp32 ] && amp=(--no-amp)
  run "extract_$mode" 240 "$PY" -m slidechat.cli.main extract-features "$SCRATCH/slides/slides" \
      --out "$SCRATCH/feat_$mode" --encoder conch_v1 --checkpoint "$SCRATCH/conch_random.safetensors" \
      --device "$DEVICE" --no-qc --no-progress "${amp[@]}" &&
    "$PY" benchmarks/gpu_suite_helper.py h5-timing "$SCRATCH/feat_$mode" --json "$OUT/extract_$mode.json" \
      >>"$OUT/extract_$mode.log" 2>&1
}

# ---- 1. conch_v1 extraction (its fp32 end-to-end baseline runs last, in whatever time is left)
if run conch_ckpt 120 "$PY" benchmarks/gpu_suite_helper.py conch-ckpt "$SCRATCH/conch_random.safetensors"; then
  run conch_encoder 120 "$PY" benchmarks/gpu_suite_helper.py conch-encoder --device "$DEVICE" \
    --checkpoint "$SCRATCH/conch_random.safetensors" "${ENC[@]}" --json "$OUT/conch_encoder.json"
  if run slides 150 "$PY" tools/make_synthetic_slides.py --out "$SCRATCH/slides" "${SLIDE[@]}"; then
    extract bf16
  else
    skip extract_bf16 "no synthetic slide"
  fi
else
  skip conch_encoder "no checkpoint"; skip extract_bf16 "no checkpoint"
fi

# ---- 2. stage-2 step, 7B-shaped LLM, LoRA, 10k patches: label logits vs stock full logits
run stage2_step 330 "$PY" benchmarks/real_size.py --part steps "${STEP[@]}" --json "$OUT/stage2_step.json"

# ---- 3. slidechat infer, Qwen2.5-VL-7B-shaped
# tools/make_tiny_qwen2vl.py --arch qwen2_5_vl with 7B sizes, weights in bf16 (random: speed only)
if "$PY" tools/make_tiny_qwen2vl.py --help 2>/dev/null | grep -q -- "--arch"; then
  DT=(); "$PY" tools/make_tiny_qwen2vl.py --help | grep -q -- "--dtype" && DT=(--dtype bf16)
  if run qwen25vl_folder 200 "$PY" tools/make_tiny_qwen2vl.py --arch qwen2_5_vl --out "$SCRATCH/qwen25vl" \
      "${VL[@]}" "${DT[@]}"; then
    run infer 200 "$PY" benchmarks/infer_throughput.py --model "$SCRATCH/qwen25vl" "${INFER[@]}" &&
      "$PY" benchmarks/gpu_suite_helper.py infer-table "$OUT/infer.log" "$OUT/infer.json"
  else
    skip infer "no model folder"
  fi
else
  skip qwen25vl_folder "tools/make_tiny_qwen2vl.py has no --arch (the Qwen2.5-VL builder is not merged here)"
  skip infer "no Qwen2.5-VL-shaped model folder"
fi

# ---- 1b. extraction baseline: fp32 (--no-amp) end to end, last because it is the least needed figure
if [ -d "$SCRATCH/slides/slides" ] && [ -f "$SCRATCH/conch_random.safetensors" ]; then
  extract fp32
else
  skip extract_fp32 "no synthetic slide or checkpoint"
fi

# ---- report
DEVNAME=$("$PY" -c "import torch,platform,os;print(torch.cuda.get_device_name(0) if torch.cuda.is_available() \
else f'{platform.machine()} CPU, {os.cpu_count()} cores, no GPU')" 2>/dev/null || echo unknown)
{
  printf '{"dry_run": %s, "device": "%s", "started": "%s", "seconds": %d, "git": "%s", "torch": "%s"}\n' \
    "$([ "$DRY" = 1 ] && echo true || echo false)" "$DEVNAME" "$(date -u -d @"$T0" +%FT%TZ)" \
    "$(( $(date +%s) - T0 ))" "$(git rev-parse --short HEAD 2>/dev/null || echo none)" \
    "$("$PY" -c 'import torch;print(torch.__version__)' 2>/dev/null)"
} >"$OUT/meta.json"
{
  echo "{"; first=1
  for k in "${!STATUS[@]}"; do
    [ $first = 1 ] || echo ","; first=0
    printf '  "%s": "%s"' "$k" "${STATUS[$k]//\"/\'}"
  done
  echo; echo "}"
} >"$OUT/status.json"
"$PY" benchmarks/gpu_suite_helper.py report "$OUT"
echo "[gpu_suite] $(( $(date +%s) - T0 )) s; $FAILED step(s) failed; report: $OUT/gpu_suite.md" >&2
exit "$FAILED"
