#!/usr/bin/env bash
# Device sitting for issue 18 on nvidia-h100-x4 (4 GPUs of one host): bench/multigpu.py at 1, 2 and 4 GPUs, weak
# (64 completions x 256 tokens per GPU) and strong (256 completions per step) scaling, 8 steps a run, then the
# SIGUSR1 stop + `--resume auto` check at 4 ranks. Runs detached (a device command may last 10 minutes; this takes
# more), so: stage, start it, poll, collect. From the project root here, `bash scripts/device_stage.sh` prints the
# staging calls; in the last one (kind nvidia-h100-x4 on every call, back to back: an idle machine is given back):
#   cp .stage_xz/<k>/* /root/stage/ && bash scripts/device_unpack.sh && setsid nohup bash bench/sitting_x4.sh > /root/sx4.log 2>&1 < /dev/null & sleep 5; cat /root/sx4.log
# then every <= 9 minutes:   sleep 420; cat /root/sx4.log; ls /root/DONE_X4 2>/dev/null
# and once /root/DONE_X4 exists:   cp /root/res_x4.tgz $OUT/
# Results: /root/res_x4/multigpu_x4.json (+ per-run metrics, plans, logs and nvidia-smi timelines) in /root/res_x4.tgz.
# Estimated wall time on H100s (from bench/results/multigpu.json on H200s and the plans' predicted step times,
# ~70 s of start-up per launch): 1 GPU x 64: 1.5 min, 2 x 128: 1.5, 4 x 256: 1.5, 1 x 256: 2, 2 x 256: 1.5,
# resume (stop after ~step 3 of 8, then resume): 2.5; about 11 minutes, plus 3-4 minutes of staging.
# CPU dry run of this script (gloo, the tiny recipe, 1 and 2 ranks; about a minute):
#   SX4_ROOT=/tmp/sx4 PYTHON=.venv/bin/python MG_RECIPE=recipes/tiny-cpu.yaml MG_GPUS=1,2 MG_PER_GPU=32 MG_GLOBAL=64 \
#   MG_TOKENS=16 MG_STEPS=5 MG_RESUME_AT=2 MG_SETS="rollout.hf_batch_size=8 logging.plots=false eval=" bash bench/sitting_x4.sh
set -uo pipefail
D=${SX4_ROOT:-/root}; PY=${PYTHON:-python3}
export PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=${TRAINER_CACHE:-$D/cache}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
export RUNS=$D/runs
R=$D/res_x4; mkdir -p $R; rm -f $D/DONE_X4
nvidia-smi > $R/nvidia-smi.txt 2>&1; nvidia-smi topo -m > $R/topo.txt 2>&1
git log -1 --format='%H %s' > $R/commit.txt 2>/dev/null
echo "=== $(date +%T) multigpu ($(nvidia-smi -L 2>/dev/null | wc -l) GPUs)"
$PY bench/multigpu.py $R > $R/multigpu.log 2>&1; rc=$?
echo "=== $(date +%T) rc $rc"
grep -v "INFO\|WARNING" $R/multigpu.log | tail -30 | cut -c1-600
for f in $R/*.log; do gzip -k -9 "$f" && rm "$f"; done  # vLLM logs are long; keep them, small
tar czf $D/res_x4.tgz -C $D res_x4
echo "=== $(date +%T) done: $(du -h $D/res_x4.tgz | cut -f1)"
touch $D/DONE_X4
