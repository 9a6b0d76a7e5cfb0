#!/usr/bin/env bash
# Device sitting for issue 23 (bench/scale.py) on one H200, after staging (scripts/device_stage.sh; its last call
# runs scripts/device_unpack.sh). Detached, writing outside $OUT; each `wait` tars what is done into $OUT:
#   bash bench/sitting_scale.sh start             # builds the shapes, the 24 GB 8B row, the 7B row (its
#                                                 last step profiled), the 40 GB 8B row, pytest -m gpu
#   bash bench/sitting_scale.sh wait [SECONDS]    # waits (default 540 s) or until done, prints progress, tars to $OUT
# Call `wait` again at once (a machine idle for 30 s is given back) until it prints "done".
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=/root/cache PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1 RUNS=/root/runs
R=/root/results/scale
case "${1:-}" in
  start)
    pkill -f scale_job.sh; pkill -f trainer.cli; pkill -f bench/scale.py; sleep 2
    [[ -d $R ]] && mv $R $R.$(date +%s)
    mkdir -p $R
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
    cat > /root/scale_job.sh <<JOB
cd $PWD
python3 bench/scale.py --build > $R/build.log 2>&1
python3 bench/scale.py $R llama-8b-24gb > $R/scale.log 2>&1
PROFILE=qwen-7b-15gb python3 bench/scale.py $R qwen-7b-15gb >> $R/scale.log 2>&1
python3 bench/scale.py $R llama-8b-40gb >> $R/scale.log 2>&1
python3 -m pytest -m gpu -q -p no:cacheprovider --ignore=tests/test_notebook.py tests > $R/pytest_gpu.txt 2>&1  # nbformat: CI only
echo done > $R/done
JOB
    setsid nohup bash /root/scale_job.sh > $R/job.log 2>&1 &
    echo "started on $(cat $R/device.txt)";;
  wait)
    for _ in $(seq $(( ${2:-540} / 5 ))); do [[ -f $R/done ]] && break; sleep 5; done
    tail -n 3 $R/build.log 2>/dev/null; grep -h '^{' $R/scale.log 2>/dev/null | cut -c1-400; tail -n 2 $R/pytest_gpu.txt 2>/dev/null
    for f in $R/*.log; do echo "== $f"; tail -n 2 "$f" | cut -c1-300; done
    mkdir -p $OUT && tar -czf $OUT/scale.tgz -C /root/results scale
    [[ -f $R/done ]] && echo "done" || echo "still running";;
  *) echo "usage: $0 start | wait [SECONDS]"; exit 2;;
esac
