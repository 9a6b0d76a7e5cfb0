#!/usr/bin/env bash
# Stage the GPU stack for the lent device in 4-5 calls instead of ../shared/device/stage.sh's 9: the same wheels
# (../shared/device/wheels.txt, downloaded by stage.sh into ./.whl), unpacked and packed as one xz tarball split in
# parts under ./.stage_xz/<k>/ sized to what a call carries beside the working tree (64 MiB in all: 58 MiB parts were
# refused on 2026-12-04 with a 6 MB tree, 52 MiB parts on 2026-12-06 with a 12.5 MB one; so the tree's bytes and 8
# MiB of margin come off, at most 52 MiB, at least 16). Left out of the tarball, because this machine never loads
# them: the bitsandbytes libraries for other CUDA/ROCm/XPU versions than 13.0, vLLM's FlashAttention-2 library
# (Hopper runs FlashAttention-3; vllm_flash_attn imports FA2 inside try/except) and vLLM's MoE kernels (40 MB of the
# 157 MB tarball, one call a sitting: dense models never call them, vLLM 0.26 imports them inside
# contextlib.suppress(ImportError), and the CPU build CI runs the engine with has none). With `unsloth`, the Unsloth peer's
# wheels (../shared/device/wheels-unsloth.txt via stage-unsloth.sh) go into a second tarball for /root/site_unsloth.
#   bash scripts/device_stage.sh [unsloth]      # prints the device calls to make, back to back
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qxF "/.stage_xz/" .git/info/exclude 2>/dev/null || echo "/.stage_xz/" >> .git/info/exclude
[[ -d .whl ]] && ls .whl/vllm-*.whl >/dev/null 2>&1 || bash ../shared/device/stage.sh >/dev/null
pack() {  # pack WHEEL_DIR NAME
  local site; site=$(mktemp -d)
  for w in "$1"/*.whl; do unzip -q -o "$w" -d "$site"; done
  rm -f "$site"/bitsandbytes/libbitsandbytes_cuda1[12]*.so "$site"/bitsandbytes/libbitsandbytes_cuda132.so \
        "$site"/bitsandbytes/libbitsandbytes_rocm*.so "$site"/bitsandbytes/libbitsandbytes_xpu*.so \
        "$site"/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so "$site"/vllm/_moe_C_stable_libtorch.abi3.so
  tar -C "$site" -cf - . | xz -T0 -6 > "/tmp/$2.tar.xz"
  rm -rf "$site"
}
tree=$(git ls-files -co --exclude-standard -z | du --files0-from=- -cb 2>/dev/null | tail -1 | cut -f1)
part=$(( (64 * 1048576 - tree) / 1048576 - 8 )); part=$(( part > 52 ? 52 : part < 16 ? 16 : part ))
rm -rf .stage_xz /tmp/stage_parts && mkdir -p .stage_xz /tmp/stage_parts
pack .whl site
split -b ${part}M -d -a 1 /tmp/site.tar.xz /tmp/stage_parts/site.tar.xz.part
if [[ ${1:-} == unsloth ]]; then
  [[ -d .whl_unsloth ]] || bash ../shared/device/stage-unsloth.sh >/dev/null
  pack .whl_unsloth site_unsloth
  split -b ${part}M -d -a 1 /tmp/site_unsloth.tar.xz /tmp/stage_parts/site_unsloth.tar.xz.part
fi
k=0
for f in $(ls /tmp/stage_parts | sort); do
  k=$((k + 1)); mkdir -p .stage_xz/$k; mv /tmp/stage_parts/$f .stage_xz/$k/
done
echo "staged $(du -sh .stage_xz | cut -f1) in $k parts of <= $part MiB (the working tree: $((tree / 1048576)) MiB). Device calls, back to back (carry .stage_xz/<k>):"
for i in $(seq 1 $k); do
  if (( i < k )); then echo "  run carry=[\".stage_xz/$i\"]: mkdir -p /root/stage && cp .stage_xz/$i/* /root/stage/"
  else echo "  run carry=[\".stage_xz/$i\"]: cp .stage_xz/$i/* /root/stage/ && bash scripts/device_unpack.sh && <command>"; fi
done
