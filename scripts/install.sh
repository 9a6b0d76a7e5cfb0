#!/usr/bin/env bash
# Install the project into ./.venv from scratch. Usage: bash scripts/install.sh [EXTRAS]   (default: dev)
#   bash scripts/install.sh            # CPU machine: torch 2.13.0 (CPU wheel where one is provided) + tests
#   bash scripts/install.sh vllm,dev   # GPU machine with vLLM: vllm's own torch pin decides the torch build
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-dev}
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [[ ",$extras," != *",vllm,"* ]]; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[$extras]"
.venv/bin/python -c "import torch, transformers, peft, trl, bitsandbytes; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__, '| bitsandbytes', bitsandbytes.__version__)"
