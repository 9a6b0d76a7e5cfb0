#!/usr/bin/env bash
# Device sitting 3 of 2026-11-26 (short): checks of what sitting 2 found, on one H100, after staging.
#  - config B at the small budget (7.6 GB) with the allocator cap following the released KV pages (sitting 2's run
#    hit the cap in the train phase and was retried with half the micro-batch);
#  - issue 16's over-budget case (0.5B shape, 16 x 2048 tokens, LoRA r64, beta 0.04) at 9.0 GB and at 3.0 GB: the
#    hard cap and the closed loop must keep nvidia-smi's peak under the budget.
# Not a side-by-side: no peer ran in this sitting, so no ratio to a peer comes from it.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=/root/cache PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
R=$OUT/s3; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader > $R/device.txt
t() { n=$1; shift; python3 bench/smi.py $R/$n.smi.json -- python3 -m trainer.cli "$@" --output-dir /root/runs/$n --overwrite > $R/$n.log 2>&1
      cp /root/runs/$n/metrics.jsonl $R/$n.metrics.jsonl 2>/dev/null; cp /root/runs/$n/plan.json $R/$n.plan.json 2>/dev/null
      cp /root/runs/$n/summary.json $R/$n.summary.json 2>/dev/null; grep -h "budget:\|smi peak\|out of memory" $R/$n.log | cut -c1-220; }
t small_B bench/peers/ours.yaml --set budget.vram_gb=7.6 --set train.generation_batch_size=64 --set grpo.max_completion_length=512 --set train.max_steps=7
C="bench/recipes/toy-digits-1.5b-vllm.yaml --set model.shape=qwen2.5-0.5b --set train.generation_batch_size=16 --set grpo.max_completion_length=2048 --set lora.r=64 --set lora.lora_alpha=128 --set grpo.beta=0.04 --set rollout.weight_format= --set rollout.kv_release= --set train.max_steps=3 --set checkpoint.save_final=false"
t i16_9gb $C --set budget.vram_gb=9.0
t i16_3gb $C --set budget.vram_gb=3.0
tar czf $OUT/s3.tgz -C $OUT s3
