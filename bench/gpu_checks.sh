#!/usr/bin/env bash
# The GPU checks in one run, for a session lent an accelerator (docs/performance.md records the
# figures). Each bench compares against its reference side by side in the same process:
# bench/devices.py (a GPU/CPU split against the single-GPU model), bench/forward.py (HF vs
# mmlens for LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision and Qwen2.5-VL shapes in bfloat16, each
# also held against HF in float32), bench/sweep.py (the papers' knockout loop vs the engine, float32 and
# bfloat16), bench/experiment.py (the runner vs the papers' per-sample loop)
# and bench/patching.py (activation patching vs the per-cell loop).
#
#   bash bench/gpu_checks.sh OUTPUT_FOLDER [SECONDS_PER_BENCH]
set -u
out=${1:?usage: bash bench/gpu_checks.sh OUTPUT_FOLDER [SECONDS_PER_BENCH]}
limit=${2:-75}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log=$out/gpu_checks.txt
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, transformer_lens as tl; from importlib.metadata import version; print('torch', torch.__version__, 'transformers', transformers.__version__, 'transformer_lens', version('transformer-lens'))"
} >"$log" 2>&1
bench() {
    local name=$1
    shift
    echo "== $name: python3 $* (limit ${limit} s)" >>"$log"
    local start=$SECONDS
    timeout "$limit" python3 "$@" >>"$log" 2>&1
    echo "-- rc=$? in $((SECONDS - start)) s" >>"$log"
}
bench devices bench/devices.py
bench forward-llava bench/forward.py --family llava --dtype bfloat16
bench forward-next bench/forward.py --family next --dtype bfloat16
bench forward-onevision bench/forward.py --family onevision --dtype bfloat16
bench forward-qwen2_5_vl bench/forward.py --family qwen2_5_vl --dtype bfloat16
bench sweep-fp32 bench/sweep.py --samples 16
bench sweep-bf16 bench/sweep.py --dtype bfloat16
bench experiment bench/experiment.py --llava-shaped --samples 32
bench patching bench/patching.py --llava-shaped
grep -v "Loading weights\|Writing model shards\|it/s\]" "$log"
