#!/usr/bin/env bash
# One device sitting: a named benchmark's job, then `pytest -m gpu`, detached on the device (a command may last 10
# minutes, a sitting longer), results under /root/results/NAME; every `wait` tars what is done into $OUT/NAME.tgz,
# so a machine given back loses nothing already polled. Stage first (here, `bash scripts/device_stage.sh [unsloth]`
# prints the device calls; make them back to back: a machine idle for 30 s is given back), then on the device:
#   bash bench/sitting.sh NAME start [ARGS ...]    # NAME's job (ARGS go to its driver), then pytest -m gpu
#   bash bench/sitting.sh NAME wait [SECONDS]      # waits (default 540 s) or until done; call again at once until "done"
# NAME: the driver it runs, the committed result it makes (docs/benchmarks.md gives each result's exact command).
#   scale         bench/scale.py --build; bench/scale.py OUT [ROW ...]   -> bench/results/scale.json
#                 (PROFILE=ROW in the environment of `start` profiles that row's last step)
#   planner       bench/planner.py OUT [NAME ...]                        -> bench/results/planner.json
#   long_context  bench/long_context.py OUT [ROW ...]                    -> bench/results/long_context.json
#   fidelity      bench/fidelity.py variants OUT [SHAPE ...]             -> bench/results/fidelity.json (its `report`)
#                 (`fidelity train SHAPE STEPS DTYPE` / `fidelity trl [STEPS] [SHAPE]`: those subcommands instead)
#   vs_peers      bench/vs_peers.py OUT (staged with `unsloth`)          -> bench/results/vs_peers.json
#   decode        bench/decode_profile.py OUT [VARIANT ...]              -> bench/results/decode_profile.json
#   nf4           bench/nf4_bench.py OUT/nf4_bench.json [--defaults]     -> bench/results/nf4_bench.json
#   microbatch    bench/microbatch.py OUT                                -> bench/results/microbatch.json
#   multigpu      bench/multigpu.py OUT (a multi-GPU kind)               -> bench/results/multigpu.json
#   multi_turn    bench/multi_turn.py OUT                                -> bench/results/multi_turn.json
#   compile       bench/compile_ab.py OUT [STEPS] [SWITCH]               -> bench/results/compile_ab.json (SWITCH
#                                                                           dynamic) or SWITCH_ab.json
#   hf_decode     bench/hf_decode.py OUT/hf_decode.json [RECIPE] [ROUNDS] -> bench/results/hf_decode.json
#   lora_tune     bench/lora_tune.py OUT [SHAPE[:RANK] ...]              -> bench/results/lora_tune/ (configs for
#                                                                           VLLM_TUNED_CONFIG_FOLDER; `compile 6 lora_tuned`)
#   vllm_inspect  bench/vllm_inspect.py OUT [ROUNDS]                      -> bench/results/vllm_inspect_<card>.json
#   hf            train bench/recipes/toy-digits-0.5b-hf.yaml under bench/smi.py; bench/report.py hf
#                                                                        -> bench/results/hf_gpu.json
#   sync          pytest -m gpu tests/test_gpu.py (GPU_TESTS_JSON), train bench/recipes/toy-digits-1.5b-vllm.yaml
#                 under bench/smi.py; bench/report.py sync               -> bench/results/sync.json
#   gpu_tests     pytest -m gpu alone
# GPU_TESTS=first runs `pytest -m gpu` before the job instead of after it, GPU_TESTS=no skips it (for a second job in
# the same sitting).
# Several jobs in one detached run (no device call between them, so no machine goes back idle in between):
#   bash bench/sitting.sh queue start 'compile' 'VAR=VALUE fidelity qwen2.5-1.5b:graphs' 'planner NAME@SPEC' ...
#   bash bench/sitting.sh queue wait [SECONDS]     # tars every item's results dir, the queue's and the run dirs' small
#                                                  # files (runs/*/metrics.jsonl ...: the steps done so far) into $OUT
# Each item is 'NAME ARGS' with optional leading VAR=VALUE environment settings; `pytest -m gpu` runs once (GPU_TESTS
# as above), each item's results under results/NAME as a lone job's (a second item of the same NAME: results/NAME.2).
# An item that runs past ITEM_TIMEOUT seconds (default 900; an item's own ITEM_TIMEOUT=N setting wins) is killed
# with rc 124 and the queue goes on: a hung compile or engine must not take the rest of the sitting with it.
# SITTING_ROOT (default /root) and PYTHON (default python3) let the script run here for a dry run.
set -uo pipefail
NAME=${1:-}; ACTION=${2:-}
D=${SITTING_ROOT:-/root}; PY=${PYTHON:-python3}; R=$D/results/$NAME
export PYTHONPATH=$D/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 TRAINER_CACHE=${TRAINER_CACHE:-$D/cache}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
export UNSLOTH_DISABLE_STATISTICS=1 RUNS=$D/runs

job() {  # the driver commands of NAME's job; "$@": the ARGS of `start`
  case $NAME in
    scale) echo "$PY bench/scale.py --build && $PY bench/scale.py $R $*";;
    planner) echo "$PY bench/planner.py $R $*";;
    long_context) echo "$PY bench/long_context.py $R $*";;
    fidelity) case ${1:-} in  # `fidelity train SHAPE STEPS DTYPE`, `fidelity trl [STEPS] [SHAPE]`; else variants
                train|trl) echo "$PY bench/fidelity.py $1 $R ${*:2}";;
                *) echo "$PY bench/fidelity.py variants $R $*";;
              esac;;
    vs_peers) echo "$PY bench/vs_peers.py $R $*";;
    decode) echo "$PY bench/decode_profile.py $R $*";;
    nf4) echo "$PY bench/nf4_bench.py $R/nf4_bench.json $*";;
    microbatch) echo "$PY bench/microbatch.py $R $*";;
    multigpu) echo "$PY bench/multigpu.py $R $*";;
    multi_turn) echo "$PY bench/multi_turn.py $R $*";;
    compile) echo "$PY bench/compile_ab.py $R $*";;
    hf_decode) echo "$PY bench/hf_decode.py $R/hf_decode.json $*";;
    lora_tune) echo "$PY bench/lora_tune.py $R $*";;
    vllm_inspect) echo "$PY bench/vllm_inspect.py $R $*";;
    hf) echo "$PY bench/smi.py $R/smi_hf.json -- $PY -m trainer.cli bench/recipes/toy-digits-0.5b-hf.yaml" \
             "--output-dir $RUNS/hf --overwrite $* && $PY bench/report.py hf $RUNS/hf $R/smi_hf.json $R/hf_gpu.json";;
    sync) echo "GPU_TESTS_JSON=$R/gpu_tests.json $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py;" \
               "$PY bench/smi.py $R/smi_sync.json -- $PY -m trainer.cli bench/recipes/toy-digits-1.5b-vllm.yaml" \
               "--output-dir $RUNS/sync --overwrite $* && $PY bench/report.py sync $RUNS/sync $R/smi_sync.json" \
               "$R/gpu_tests.json $R/sync.json";;
    gpu_tests) echo "true";;
    *) return 1;;
  esac
}

fresh() {  # fresh DIR: an empty results dir (an earlier one of that name kept aside)
  [[ -d $1 ]] && mv "$1" "$1.$(date +%s)"
  mkdir -p "$1"
}

test_steps() {  # test_steps DIR: sets $before / $after, the job's `pytest -m gpu` step (GPU_TESTS), output under DIR
  local tests="timeout -k 30 ${GPU_TESTS_TIMEOUT:-900} $PY -m pytest -m gpu -q -p no:cacheprovider --durations=10 --ignore=tests/test_notebook.py tests > $1/pytest_gpu.txt 2>&1"
  case ${GPU_TESTS:-last} in  # --ignore: the device lacks nbformat; the notebook runs in CI
    first) before=$tests; after=true;; no) before=true; after=true;; *) before=true; after=$tests;;
  esac
}

new_job() {  # new_job DIR: stops a running job, makes DIR fresh with the device's name in it
  pkill -f "$D/sitting_job.sh" 2>/dev/null; sleep 1
  fresh "$1"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$1/device.txt" 2>&1
}

staged() {  # the GPU stack unpacked at $D/site (scripts/device_unpack.sh), or no job starts: on a fresh machine a
  # queue started without it ran each item to a FileNotFoundError, 140 s of device time (2026-12-06)
  [[ -d $D/site ]] && return 0
  echo "the GPU stack is not staged at $D/site (a fresh machine?): make the staging calls first (here, bash" \
       "scripts/device_stage.sh prints them), then start again"
  exit 2
}

queue_start() {  # queue_start ITEM ...: one job script running each ITEM's driver in turn
  local Q=$D/results/queue before after item envs rest
  staged
  new_job "$Q"
  test_steps "$Q"
  { echo "cd $PWD"; echo "$before"; } > "$D/sitting_job.sh"
  : > "$Q/items"
  for item in "$@"; do
    envs=""; rest=$item
    while [[ $rest =~ ^([A-Za-z_][A-Za-z0-9_]*=[^ ]*)\ +(.*)$ ]]; do envs+="export ${BASH_REMATCH[1]}; "; rest=${BASH_REMATCH[2]}; done
    read -r -a words <<< "$rest"
    NAME=${words[0]}; dir=$NAME; k=1
    while grep -qxF "$dir" "$Q/items"; do k=$((k + 1)); dir=$NAME.$k; done  # a second item of NAME: results/NAME.2
    R=$D/results/$dir
    cmd=$(job "${words[@]:1}") || { echo "unknown sitting: '$NAME' (see the header of $0)"; exit 2; }
    fresh "$R"; cp "$Q/device.txt" "$R/device.txt"
    echo "$dir" >> "$Q/items"
    echo "$(date -u +%FT%TZ) $NAME: $envs$cmd" > "$R/command.txt"
    limit=${ITEM_TIMEOUT:-900}; [[ $envs =~ ITEM_TIMEOUT=([0-9]+) ]] && limit=${BASH_REMATCH[1]}
    echo "( ${envs}timeout -k 30 $limit bash -c $(printf %q "$cmd") ) > $R/$NAME.log 2>&1;" \
         "echo \"rc \$?\" >> $R/$NAME.log; echo done > $R/done" >> "$D/sitting_job.sh"
  done
  { echo "$after"; echo "echo done > $Q/done"; } >> "$D/sitting_job.sh"
  setsid nohup bash "$D/sitting_job.sh" > "$Q/job.log" 2>&1 < /dev/null &
  echo "started a queue of $# on $(head -1 "$Q/device.txt"): $(tr '\n' ' ' < "$Q/items")"
}

queue_wait() {  # queue_wait [SECONDS]
  local Q=$D/results/queue n
  [[ -d $Q ]] || { echo "no queue started under $D/results"; exit 2; }
  for _ in $(seq $(( ${1:-540} / 5 ))); do [[ -f $Q/done ]] && break; sleep 5; done
  while read -r n; do
    if [[ -f $D/results/$n/done ]]; then echo "== $n: done"; else echo "== $n: not done"; fi
    grep -h '^{' "$D/results/$n/${n%.*}.log" 2>/dev/null | cut -c1-300 | tail -5
    tail -n 2 "$D/results/$n/${n%.*}.log" 2>/dev/null | cut -c1-300
  done < "$Q/items"
  tail -n 2 "$Q/pytest_gpu.txt" 2>/dev/null
  local runs; runs=$(run_files)  # none yet: no trailing -C (GNU tar fails on a -C with nothing after it)
  mkdir -p "${OUT:-$D/out}" && tar -czf "${OUT:-$D/out}/queue.tgz" -C "$D/results" queue $(cat "$Q/items") \
    ${runs:+-C "$D" $runs}
  [[ -f $Q/done ]] && echo "done" || echo "still running"
}

run_files() {  # the small files of every run dir under $D/runs, relative to $D: a run still going when the machine
  # goes back keeps the steps it finished (its driver collects them only at the end; 2026-12-03's 8B row lost them)
  (cd "$D" && ls runs/*/{plan.json,engine.json,summary.json,metrics.jsonl,memory.jsonl,compiles.jsonl} runs/*/profile_step*.txt 2>/dev/null)
}

if [[ $NAME == queue ]]; then
  case "$ACTION" in
    start) shift 2; queue_start "$@";;
    wait) queue_wait "${3:-540}";;
    *) echo "usage: $0 queue start 'NAME ARGS' ... | queue wait [SECONDS]"; exit 2;;
  esac
  exit 0
fi

case "$ACTION" in
  start)
    shift 2
    cmd=$(job "$@") || { echo "unknown sitting: '$NAME' (see the header of $0)"; exit 2; }
    staged
    new_job "$R"
    echo "$(date -u +%FT%TZ) $NAME: $cmd" > "$R/command.txt"
    test_steps "$R"
    cat > "$D/sitting_job.sh" <<JOB
cd $PWD
$before
( $cmd ) > $R/$NAME.log 2>&1; echo "rc \$?" >> $R/$NAME.log
$after
echo done > $R/done
JOB
    setsid nohup bash "$D/sitting_job.sh" > "$R/job.log" 2>&1 < /dev/null &
    echo "started $NAME on $(head -1 "$R/device.txt"): $cmd";;
  wait)
    [[ -d $R ]] || { echo "no sitting '$NAME' started under $D/results"; exit 2; }
    for _ in $(seq $(( ${3:-540} / 5 ))); do [[ -f $R/done ]] && break; sleep 5; done
    grep -h '^{' "$R/$NAME.log" 2>/dev/null | cut -c1-300 | tail -20
    for f in "$R"/*.log; do echo "== $f"; tail -n 2 "$f" | cut -c1-300; done
    tail -n 2 "$R/pytest_gpu.txt" 2>/dev/null
    mkdir -p "${OUT:-$D/out}" && tar -czf "${OUT:-$D/out}/$NAME.tgz" -C "$D/results" "$NAME"
    [[ -f $R/done ]] && echo "done" || echo "still running";;
  *) echo "usage: $0 NAME start [ARGS ...] | NAME wait [SECONDS]  (NAME: see the header)"; exit 2;;
esac
