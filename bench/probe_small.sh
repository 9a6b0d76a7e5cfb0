# Why the smallest-budget point is slow (bench/results/small_point_probe.json): three of our runs on config A on a
# quiet GPU, with torch.profiler over step 4. Run on the device after staging: bash bench/probe_small.sh
cd /root/work 2>/dev/null || { cp -r . /root/work && cd /root/work && rm -rf .stage; }
export PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=/root/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
P="python3 -m trainer.cli bench/peers/ours.yaml --overwrite --set train.max_steps=5"
run() { n=$1; shift; TRAINER_PROFILE_STEP=4 $P --output-dir /root/runs/$n "$@" > $OUT/$n.log 2>&1; cp /root/runs/$n/profile_step4.txt $OUT/$n.prof.txt; python3 -c "
import json,statistics as st;m=[json.loads(x) for x in open('/root/runs/$n/metrics.jsonl')][1:]
print('$n',{k:round(st.median(x[k] for x in m),3) for k in m[0] if k.startswith('time_')})"; }
run small_A --set budget.vram_gb=3.0
run mb288_norel --set rollout.weight_format=shared_nf4 --set train.micro_batch_tokens=288 --set rollout.kv_release=false
run mb2304_rel --set rollout.weight_format=shared_nf4 --set train.micro_batch_tokens=2304 --set rollout.kv_release=true
