#!/usr/bin/env bash
# Device sitting 2 of 2026-11-26 (issue 15's benchmark): the fused nf4 GEMM microbenchmark, then the side-by-side
# with TRL and Unsloth on one H100 (bench/vs_peers.py). After `scripts/device_stage.sh unsloth`, from the root:
#   setsid nohup bash bench/sitting2.sh > /root/s2.log 2>&1 &       # results in /root/res.tgz, then /root/DONE
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=/root/cache PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
R=/root/res; mkdir -p $R; rm -f /root/DONE
nvidia-smi > $R/nvidia-smi.txt 2>&1
echo "=== $(date +%T) nf4_bench"; python3 bench/nf4_bench.py $R/nf4_bench.json > $R/nf4_bench.log 2>&1; tail -1 $R/nf4_bench.log
echo "=== $(date +%T) vs_peers"; python3 bench/vs_peers.py $R/vs > $R/vs.log 2>&1
python3 bench/peers/report.py $R/vs/raw $R/vs/vs_peers_h100.json $R/vs/vs_peers_h100.png >> $R/vs.log 2>&1
echo "=== $(date +%T) done"
tar czf /root/res.tgz -C /root res --exclude='*.log.big'
touch /root/DONE
