#!/usr/bin/env bash
# One device sitting on a two-GPU machine: issue 8 (bench/multigpu.py), then issue 10 (bench/vs_peers.py).
# After staging (../shared/device/stage.sh, stage-unsloth.sh into /root/site_unsloth), from the project root:
#   setsid nohup bash bench/sitting.sh > /root/sitting.log 2>&1 &       # results under /root/results, then DONE
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=/root/cache PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
R=/root/results; mkdir -p $R; rm -f /root/DONE
nvidia-smi > $R/nvidia-smi.txt 2>&1
[[ ${SKIP_MG:-0} == 1 ]] || python3 bench/multigpu.py $R/mg > $R/mg.log 2>&1
[[ ${SKIP_VS:-0} == 1 ]] || python3 bench/vs_peers.py $R/vs ${GPUS:-0,1} > $R/vs.log 2>&1
tar czf /root/results.tgz -C /root results
touch /root/DONE
