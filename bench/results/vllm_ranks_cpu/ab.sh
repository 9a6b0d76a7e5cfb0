#!/usr/bin/env bash
# CPU A/B of vllm_internals.count_ranks_eagerly: old = the engine without the install line, new = with it.
set -u
cd /work/main
out=bench/results/vllm_ranks_cpu
cp trainer/rollout/vllm.py /tmp/vllm_new.py
sed '/self.vi.count_ranks_eagerly()/d' /tmp/vllm_new.py > /tmp/vllm_old.py
for arm in new old new old; do
  cp /tmp/vllm_$arm.py trainer/rollout/vllm.py
  home=$(mktemp -d); tmp=$(mktemp -d); run=$(mktemp -d)
  t0=$(date +%s.%N)
  XDG_CACHE_HOME=$home TMPDIR=$tmp .venv/bin/python -m trainer.cli recipes/tiny-cpu.yaml --set rollout.engine=vllm \
    --set train.max_steps=1 --output-dir $run/r --overwrite > $run/log 2>&1
  rc=$?
  t1=$(date +%s.%N)
  step=$(grep -o "step    1 .*" $run/log | head -1)
  echo "{\"arm\": \"$arm\", \"rc\": $rc, \"wall_s\": $(echo "$t1 - $t0" | bc), \"step1\": \"${step//\"/}\"}" | tee -a $out/runs.jsonl
  rm -rf $home $tmp $run
done
cp /tmp/vllm_new.py trainer/rollout/vllm.py
