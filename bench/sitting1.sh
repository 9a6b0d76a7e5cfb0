#!/usr/bin/env bash
# Device sitting 1 of 2026-11-26 (issue 15 profile + candidates, issue 16 calibration data). After staging
# (scripts/device_stage.sh), from the project root:  setsid nohup bash bench/sitting1.sh > /root/s1.log 2>&1 &
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=/root/cache PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
R=/root/res; mkdir -p $R; rm -f /root/DONE
nvidia-smi > $R/nvidia-smi.txt 2>&1
( while [ ! -f /root/DONE ]; do echo "$(date +%s.%N) $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits) | $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | tr '\n' ';')" >> $R/smi_both.log; sleep 1; done ) &
stage() { echo "=== $(date +%T) $*"; }
stage decode_profile
TRAIN_PROBE=shared_nf4_fused python3 bench/decode_profile.py $R/decode shared_nf4_fused shared_nf4 bf16_mirror > $R/decode.log 2>&1
stage e2e
P="python3 -m trainer.cli bench/peers/ours.yaml --overwrite --set data.max_prompt_length=128 --set train.max_steps=6"
for v in fused bitsandbytes; do
  python3 bench/smi.py $R/e2e_A_nf4_$v.smi.json -- $P --output-dir /root/runs/A_nf4_$v --set budget.vram_gb=6.6 \
    --set rollout.weight_format=shared_nf4 --set rollout.nf4_gemm=$v > $R/e2e_A_nf4_$v.log 2>&1
  cp /root/runs/A_nf4_$v/metrics.jsonl $R/e2e_A_nf4_$v.metrics.jsonl; cp /root/runs/A_nf4_$v/plan.json $R/e2e_A_nf4_$v.plan.json
done
python3 bench/smi.py $R/e2e_B_nf4_fused.smi.json -- $P --output-dir /root/runs/B_nf4 --set budget.vram_gb=14.5 \
  --set train.generation_batch_size=64 --set grpo.max_completion_length=512 --set rollout.nf4_gemm=fused > $R/e2e_B_nf4_fused.log 2>&1
cp /root/runs/B_nf4/metrics.jsonl $R/e2e_B_nf4_fused.metrics.jsonl; cp /root/runs/B_nf4/plan.json $R/e2e_B_nf4_fused.plan.json
stage mem_0.5b
python3 bench/train_probe.py qwen2.5-0.5b $R/mem_0.5b.json > $R/mem_0.5b.log 2>&1
stage done
touch /root/DONE
sleep 2; tar czf /root/res.tgz -C /root res
