#!/usr/bin/env bash
# On the device, in the last staging call (see scripts/device_stage.sh): unpack the staged tarballs into /root/site
# (and /root/site_unsloth), then use PYTHONPATH=/root/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0.
set -euo pipefail
mkdir -p /root/site
cat /root/stage/site.tar.xz.part* | xz -dc -T0 | tar -C /root/site -xf -
if compgen -G "/root/stage/site_unsloth.tar.xz.part*" >/dev/null; then
  mkdir -p /root/site_unsloth && cat /root/stage/site_unsloth.tar.xz.part* | xz -dc -T0 | tar -C /root/site_unsloth -xf -
fi
echo "unpacked $(ls /root/site | wc -l) entries into /root/site$([[ -d /root/site_unsloth ]] && echo ' and /root/site_unsloth')"
