#!/usr/bin/env bash
# Device sitting for issue 16's planner grid (bench/planner.py), one H100 (ask kind nvidia-h100-x1), after staging
# (scripts/device_stage.sh; its last call runs scripts/device_unpack.sh). The grid takes ~20 min for the 0.5B and
# 1.5B configs (`python bench/planner.py --predict` estimates it) and more with the 7B shapes, longer than one
# device command, so it runs detached and writes outside $OUT:
#   bash bench/sitting_planner.sh start [NAME ...]   # starts bench/planner.py under nohup (default: every config)
#   bash bench/sitting_planner.sh wait               # waits up to 9 min, prints progress, copies results to $OUT
# Call `wait` again at once (the machine is given back after 30 s idle) until it prints "done".
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=/root/cache PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
R=/root/results/planner
case "${1:-}" in
  start)
    shift; mkdir -p $R
    nvidia-smi --query-gpu=name --format=csv,noheader > $R/device.txt
    nohup python3 bench/planner.py $R "$@" > $R/planner.log 2>&1 &
    echo $! > $R/pid; echo "started pid $(cat $R/pid) on $(cat $R/device.txt)";;
  wait)
    for _ in $(seq 108); do kill -0 "$(cat $R/pid)" 2>/dev/null || break; sleep 5; done
    grep -h '^{' $R/planner.log | cut -c1-200
    mkdir -p $OUT/planner && cp $R/*.json $R/*.log $R/device.txt $OUT/planner/ 2>/dev/null
    kill -0 "$(cat $R/pid)" 2>/dev/null && echo "still running" || echo "done";;
  *) echo "usage: $0 start [NAME ...] | wait"; exit 2;;
esac
