#!/usr/bin/env bash
# Set up a CUDA machine: .venv with PyPI's CUDA builds of torch and vLLM 0.32, DeepSpeed,
# and minorsft installed editable with its dev tools (pytest for `pytest -m gpu`).
# Safe to re-run. Needs a CUDA driver recent enough for PyPI's torch 2.13.0 wheel.
#
# vLLM 0.32 pins torch==2.13.0, torchvision==0.28.0, torchaudio==2.11.0 and
# transformers<5.20; they are installed together in one resolve, so pip cannot pick
# a torch that vLLM would then replace.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "torch==2.13.0" "torchvision==0.28.0" "torchaudio==2.11.0" -e ".[gpu,dev]"
.venv/bin/python -c "import torch, transformers, vllm, deepspeed, minorsft_core; print('minorsft env ok: torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count(), '| transformers', transformers.__version__, '| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__)"
# Stage two compiles DeepSpeed's fused Adam with nvcc on its first run; say now whether it can.
.venv/bin/python -c "from train.ds_ops import fused_adam_facts, fused_adam_problem; problem = fused_adam_problem(**fused_adam_facts()); print('setup-gpu: DeepSpeed fused Adam (stage two):', problem or 'can be compiled or loaded here')"
