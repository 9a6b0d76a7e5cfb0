#!/usr/bin/env bash
# Device sitting for bench/fused_ab.py (one GPU), after staging and stage-unsloth.sh into /root/site_unsloth:
#   setsid nohup bash bench/fused_sitting.sh > /root/fused.log 2>&1 &      # results in /root/fab, then /root/DONE
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=/root/cache PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
rm -f /root/DONE; mkdir -p /root/fab
python3 bench/fused_ab.py /root/fab > /root/fab/fused_ab.log 2>&1
tar czf /root/fab.tgz -C /root fab
touch /root/DONE
