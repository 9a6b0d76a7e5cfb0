#!/usr/bin/env bash
# One device sitting: GPU tests, the HF 0.5B check (issue 2) and the 200-step vLLM sync run (issue 3).
# Run from the project root on the device after staging (../shared/device/stage.sh):
#   bash scripts/gpu_run.sh [tests|hf|sync|all]
# Writes logs and results under $OUT (default ./gpu_out). Each part runs even if an earlier one failed.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=${TRAINER_CACHE:-/root/cache}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
what=${1:-all}
SETS=(); for x in ${GPU_SETS:-}; do SETS+=(--set "$x"); done  # e.g. GPU_SETS="rollout.compile=true"
if [[ $what == tests || $what == all ]]; then
  GPU_TESTS_JSON=$OUT/gpu_tests.json python3 -m pytest -m gpu tests/test_gpu.py -x -q -p no:cacheprovider 2>&1 | tail -40 | tee $OUT/gpu_tests.log
fi
if [[ $what == hf || $what == all ]]; then
  python3 bench/smi.py $OUT/smi_hf.json -- python3 -m trainer.cli bench/recipes/toy-digits-0.5b-hf.yaml \
    --output-dir /root/runs/hf --overwrite "${SETS[@]}" > $OUT/hf.log 2>&1
  tail -5 $OUT/hf.log
  python3 bench/report.py hf /root/runs/hf $OUT/smi_hf.json $OUT/hf_gpu.json
fi
if [[ $what == sync || $what == all ]]; then
  python3 bench/smi.py $OUT/smi_sync.json -- python3 -m trainer.cli bench/recipes/toy-digits-1.5b-vllm.yaml \
    --output-dir /root/runs/sync --overwrite "${SETS[@]}" ${SYNC_ARGS:-} > $OUT/sync.log 2>&1
  grep -v "INFO" $OUT/sync.log | tail -8
  cp /root/runs/sync/engine.json $OUT/engine_sync.json 2>/dev/null
  python3 bench/report.py sync /root/runs/sync $OUT/smi_sync.json $OUT/gpu_tests.json $OUT/sync.json
fi
