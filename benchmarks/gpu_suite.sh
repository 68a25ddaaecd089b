#!/usr/bin/env bash
# Everything only a GPU can show, in one command on one H100/H200 (about 8 minutes), written under
# benchmarks/results/gpu/ with device, versions and commit (stamp.json, and in every JSONL row):
#
#   1. pytest -m gpu                          the CUDA tests (compiled Triton kernels, pinned-memory trajectory cache)
#   2. benchmarks/connector_bandwidth.py                  compiled connector bandwidth vs a device copy, FLUX/SD3 latent sizes
#   3. benchmarks/memory_vs_depth.py          FLUX.1-dev and SD3.5-M architectures (random bf16 weights), 512²,
#                                             T = 25, 1/2/3 leaps, full backprop and the baselines, checkpointing on,
#                                             LoRA 64 and full fine-tuning (OOM rows recorded as such), with the
#                                             planner's error against every measured row (planner_error.md)
#   4. benchmarks/step_overhead.py            step time vs its lower bound; rollout vs the diffusers pipeline loop
#
#   benchmarks/gpu_suite.sh             # on the GPU machine
#   benchmarks/gpu_suite.sh --dry-run   # the same scripts on CPU with tiny configs (CI runs this: it cannot rot)
#
# Each part has its own time limit, so a slow or failing part still leaves the others' results; the suite exits
# non-zero if any part failed, and summary.txt says which.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=benchmarks/results/gpu
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; OUT="$(mktemp -d)/gpu"; shift ;;
    --output) OUT="$2"; shift 2 ;;
    *) echo "error: unknown argument $1; use --dry-run or --output DIR" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to NAME.log, record the outcome
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $((SECONDS - start)) s (limit $limit s)" | tee -a "$SUMMARY"
  [[ $rc -eq 0 ]] || FAILED=1
}

python - "$OUT/stamp.json" <<'EOF'
import json, sys
import torch
from benchmarks.common import stamp
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
json.dump(stamp(device), open(sys.argv[1], "w"), indent=2)
EOF

if [[ $DRY -eq 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""
  part pytest_gpu 120 python -m pytest -m gpu --collect-only -q -p no:randomly tests
  part kernels 120 python benchmarks/connector_bandwidth.py --output "$OUT"
  part memory_vs_depth 300 python benchmarks/memory_vs_depth.py --models tiny --steps 4 --repeats 1 \
    --tiny-resolution 32 --batch-size 1 --objectives leapalign-1 leapalign-2 leapalign-3 full_backprop \
    --output "$OUT/tiny"
  part step_overhead 120 python benchmarks/step_overhead.py --steps 4 --resolution 32 --repeats 1 --output "$OUT"
else
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: no CUDA device; run with --dry-run on CPU" >&2; exit 2; }
  part pytest_gpu 120 python -m pytest -m gpu -q -p no:randomly tests
  part kernels 60 python benchmarks/connector_bandwidth.py --output "$OUT"
  part memory_lora 150 python benchmarks/memory_vs_depth.py --models flux-dev sd35-medium --resolutions 512 \
    --steps 25 --repeats 1 --lora-rank 64 --output "$OUT/lora64"
  part memory_full 90 python benchmarks/memory_vs_depth.py --models flux-dev sd35-medium --resolutions 512 \
    --steps 25 --repeats 1 --lora-rank 0 --objectives leapalign-1 leapalign-2 leapalign-3 full_backprop \
    --output "$OUT/full"
  part step_overhead 60 python benchmarks/step_overhead.py --output "$OUT"
fi

echo "results: $OUT" | tee -a "$SUMMARY"
exit $FAILED
