#!/usr/bin/env bash
# Device sitting 4 of 2026-11-26 (short): sitting 3's two failures rerun after the cap fixes (cap calibrated from
# measured non-torch memory; test models built before the cap). One H100, after staging; no peer ran here.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=/root/cache PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
R=$OUT/s4; mkdir -p $R
t() { n=$1; shift; python3 bench/smi.py $R/$n.smi.json -- python3 -m trainer.cli "$@" --output-dir /root/runs/$n --overwrite > /root/$n.log 2>&1
      mkdir -p $R/$n; cp /root/runs/$n/{metrics.jsonl,plan.json,summary.json} $R/$n/ 2>/dev/null; grep -v INFO /root/$n.log | tail -40 > $R/$n/log.txt
      grep -h "budget:\|smi peak\|out of memory\|calibrated" /root/$n.log | cut -c1-220; }
C="bench/recipes/toy-digits-1.5b-vllm.yaml --set model.shape=qwen2.5-0.5b --set train.generation_batch_size=16 --set grpo.max_completion_length=2048 --set lora.r=64 --set lora.lora_alpha=128 --set grpo.beta=0.04 --set rollout.weight_format= --set rollout.kv_release= --set train.max_steps=3 --set checkpoint.save_final=false"
t i16_3gb $C --set budget.vram_gb=3.0
t small_B bench/peers/ours.yaml --set budget.vram_gb=7.6 --set train.generation_batch_size=64 --set grpo.max_completion_length=512 --set train.max_steps=7
tar czf /root/s4.tgz -C $OUT s4 && rm -rf $R && mv /root/s4.tgz $OUT/
