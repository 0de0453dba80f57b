"""DeepSpeed's JIT-built ops: where they are built, stale build locks, building at set-up.

On CPU DeepSpeed compiles its shared-memory communication op on first use (about 80 s
on two cores) through torch's ``cpp_extension``, under ``TORCH_EXTENSIONS_DIR``
(default: ``~/.cache/torch_extensions``, shared by every virtual environment of the
user, though each build belongs to one torch). While a process builds, a ``lock`` file
sits in the op's build directory; a process killed mid-build leaves it behind, and
every later run then waits on it forever without a word.

Builds run ninja, found on ``PATH``. A machine often has two: the system's and the
``ninja`` wheel in the environment (on ``PATH`` only when the environment is activated,
as job scripts do). Their build logs are incompatible (ninja 1.12 changed the log's
format and command hash), so each switch between them rebuilds the op from scratch:
50 s on an idle 2-core machine, twice within one CI test run before this was fixed.

So: ``use_environment_build_dir`` puts the builds inside the environment that owns
them (``sys.prefix/torch_extensions``, unless the user set ``TORCH_EXTENSIONS_DIR``),
``use_environment_ninja`` makes every build run that environment's ninja when it has one,
``wait_for_build_lock`` says what it waits for and removes a lock nobody works under,
and ``python -m train.ds_ops`` (``scripts/setup-cpu.sh``) builds the op at set-up time.
Nothing here imports deepspeed at import time; ``train.engine`` calls ``prepare_builds``
(all but the last) before it imports deepspeed.

On a GPU the op built on first use is DeepSpeed's fused Adam (the optimizer's CUDA
kernel), compiled with the CUDA toolkit's ``nvcc``, which PyPI's torch does not bring.
``fused_adam_problem`` says, before any model is loaded, why that build would fail here;
without it the job fails only once the model is loaded and the engine built.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

SHM_COMM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME in deepspeed 0.19
FUSED_ADAM_OP = "fused_adam"  # FusedAdamBuilder.NAME: the GPU optimizer's kernel
# A build writes object files every few seconds; a lock whose build directory has seen
# no write for this long belongs to a build that was killed.
STALE_AFTER_S = 300


def use_environment_build_dir() -> Path:
    """Set ``TORCH_EXTENSIONS_DIR`` to ``sys.prefix/torch_extensions`` unless the user set
    it (or the environment is not writable); return the directory builds go to."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def use_environment_ninja() -> None:
    """Put ``sys.prefix/bin`` first on ``PATH`` when it holds a ``ninja``: every build of this
    environment's ops then runs the same ninja, whoever started the process and with
    whatever ``PATH`` (see the module docstring). Without one, ``PATH`` is left alone."""
    bin_dir = Path(sys.prefix) / "bin"
    if not (bin_dir / "ninja").is_file():
        return
    entries = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry]
    if not entries or entries[0] != str(bin_dir):
        os.environ["PATH"] = os.pathsep.join([str(bin_dir), *entries])


def wait_for_build_lock(op_dir: Path, *, stale_after_s: float = STALE_AFTER_S, poll_s: float = 1.0,
                        say=lambda message: print(f"minorsft: {message}", file=sys.stderr, flush=True)) -> None:
    """Return once ``op_dir/lock`` is gone. A lock whose build directory has not been
    written to for ``stale_after_s`` is a killed build's: it is removed, with a message.
    Meanwhile the wait is announced once, naming the lock."""
    lock = op_dir / "lock"
    announced = False
    while lock.exists():
        try:
            idle_s = time.time() - max(p.stat().st_mtime for p in op_dir.rglob("*"))
        except (FileNotFoundError, ValueError):  # the build finished and cleaned up meanwhile
            time.sleep(poll_s)
            continue
        if idle_s > stale_after_s:
            lock.unlink(missing_ok=True)
            say(f"removed {lock}: a build of DeepSpeed's {op_dir.name} op left it {idle_s:.0f} s ago and nothing "
                "has written there since (a killed build); building again")
            return
        if not announced:
            say(f"waiting for another process's build of DeepSpeed's {op_dir.name} op (lock {lock}); a lock "
                f"with no build activity for {stale_after_s:.0f} s is treated as left by a killed build")
            announced = True
        time.sleep(poll_s)


def prepare_builds() -> None:
    """Before deepspeed is imported: builds in this environment, no stale lock waited on.
    Only local rank 0 clears a stale lock; the other ranks wait in DeepSpeed's own loop."""
    build_dir = use_environment_build_dir()
    use_environment_ninja()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        for op in (SHM_COMM_OP, FUSED_ADAM_OP):
            wait_for_build_lock(build_dir / op)


def fused_adam_problem(*, cuda_home: str | None, torch_cuda: str | None, prebuilt: bool,
                       built: bool) -> str | None:
    """Why DeepSpeed's fused Adam cannot be loaded here, or None when it can.

    ``prebuilt``: installed with ``DS_BUILD_FUSED_ADAM=1``, nothing to build. Otherwise
    torch's JIT loader writes the link flags from ``cuda_home`` (torch's ``CUDA_HOME``: the
    variable, else ``nvcc`` on ``PATH``, else ``/usr/local/cuda``) and raises without one,
    even when the op is ``built`` already (a cached build loads without compiling).
    When the op must be compiled, ``bin/nvcc`` must run, and its major CUDA version must be
    torch's: torch's and DeepSpeed's set-up builds refuse another one
    (``cpp_extension._check_cuda_version``, ``assert_no_cuda_mismatch``)."""
    if prebuilt or torch_cuda is None:
        return None
    fix = (f"install the CUDA {torch_cuda.split('.')[0]}.x toolkit (nvcc) torch was built for (CUDA {torch_cuda}), "
           "or load it (`module load cuda/...`) and set CUDA_HOME to it; or install DeepSpeed with the op "
           "prebuilt: DS_BUILD_FUSED_ADAM=1 pip install --no-build-isolation deepspeed")
    if cuda_home is None:
        return f"no CUDA toolkit found (CUDA_HOME unset, no nvcc on PATH, no /usr/local/cuda): {fix}"
    if built:
        return None
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    try:
        version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=120,
                                 check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"CUDA_HOME is {cuda_home}, but {nvcc} does not run ({err}): {fix}"
    found = re.search(r"release (\d+)\.(\d+)", version)
    if found and found.group(1) != torch_cuda.split(".")[0]:
        return f"{nvcc} is CUDA {found.group(1)}.{found.group(2)}, torch was built with CUDA {torch_cuda}: {fix}"
    return None


def fused_adam_facts() -> dict:
    """This machine's arguments of ``fused_adam_problem`` (imports deepspeed, for its record of
    prebuilt ops)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    prepare_builds()
    built = any((use_environment_build_dir() / FUSED_ADAM_OP).glob(f"{FUSED_ADAM_OP}*.so"))
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        installed_ops = {}
    return dict(cuda_home=CUDA_HOME, torch_cuda=torch.version.cuda,
                prebuilt=bool(installed_ops.get(FUSED_ADAM_OP, False)), built=built)


def build_ops() -> Path:
    """Build the CPU communication op now (set-up time); return its build directory."""
    prepare_builds()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    if build_shm_op() is None:
        raise RuntimeError("DeepSpeed reports its shared-memory communication op incompatible here")
    return use_environment_build_dir() / SHM_COMM_OP


if __name__ == "__main__":
    print(f"built {build_ops()}")
