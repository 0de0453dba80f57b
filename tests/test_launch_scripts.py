"""The shipped set-up and cluster scripts, run for real where this machine allows.

SLURM is not installed here: the batch scripts run as the scheduler would run them,
with the ``SLURM_*`` variables it sets, and ``srun`` / ``scontrol`` replaced by the
smallest stand-ins that do what those commands do on one node (run the command; print
the host name; record a requeue). Everything they launch is the real thing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import make_records, write_jsonl
from train_fixtures import end_process_tree, write_stage_one_output

from minorsft_core import schema
from minorsft_core.errors import EXIT_BAD_INPUT

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "scripts" / "cluster"
BIN = Path(sys.executable).parent
SHELL_SCRIPTS = sorted([*REPO.glob("scripts/**/*.sh"), *CLUSTER.glob("*.sbatch"), REPO / ".ci" / "run"])


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cluster_scripts_exist():
    names = {p.name for p in CLUSTER.iterdir()}
    assert {"precompute-array.sbatch", "train-multinode.sbatch", "precompute-indexed-job.yaml"} <= names


# --- set-up -------------------------------------------------------------------------

def _stub_wheel(directory: Path, version: str) -> None:
    """A wheel that only names itself: enough for pip to resolve it, never installed."""
    directory.mkdir()
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(directory / f"torch-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


@pytest.mark.parametrize("local_version, source", [
    ("2.13.0+cpu", "the configured pip sources (local wheel)"),  # this machine: offline
    ("2.13.0", "PyTorch's CPU index https://download.pytorch.org/whl/cpu"),  # only PyPI's CUDA build
])
def test_setup_cpu_takes_torch_from_the_cpu_index_unless_a_source_holds_the_cpu_build(tmp_path, local_version, source):
    _stub_wheel(tmp_path / "wheels", local_version)
    # pip sees only the stub directory: no config file, no index (the test stays offline).
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "wheels"))
    result = subprocess.run(["bash", str(REPO / "scripts" / "setup-cpu.sh"), "--dry-run"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"setup-cpu: torch==2.13.0+cpu from {source}"


# --- Kubernetes ---------------------------------------------------------------------

def test_indexed_job_manifest():
    documents = list(yaml.safe_load_all((CLUSTER / "precompute-indexed-job.yaml").read_text()))
    claim = next(d for d in documents if d["kind"] == "PersistentVolumeClaim")
    job = next(d for d in documents if d["kind"] == "Job")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 2
    assert spec["backoffLimitPerIndex"] >= 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    (container,) = pod["containers"]
    # Exit 3 (unusable input) fails its index without a retry.
    exit_rules = [r for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r]
    assert [(r["action"], r["onExitCodes"]["operator"], r["onExitCodes"]["values"]) for r in exit_rules] == [
        ("FailIndex", "In", [3])]
    assert exit_rules[0]["onExitCodes"]["containerName"] == container["name"]
    args = container["args"]
    assert args[0] == "precompute"
    assert args[args.index("--worker-index") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert int(args[args.index("--num-workers") + 1]) == spec["completions"]
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    for flag in ("--data", "--output", "--model"):  # everything a worker shares lives on the volume
        assert args[args.index(flag) + 1].startswith(mount["mountPath"] + "/")


# --- SLURM --------------------------------------------------------------------------

def _slurm_bin(tmp_path: Path) -> Path:
    """``srun`` runs its command once (one node, one task); ``scontrol`` prints this host
    for ``show hostnames`` and records ``requeue`` calls in ``requeues.log``."""
    bin_dir = tmp_path / "slurm-bin"
    if bin_dir.exists():
        return bin_dir
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\ncase "$1" in\n  show) echo localhost ;;\n'
        f'  requeue) echo "requeue $2" >> {tmp_path}/requeues.log ;;\n  *) exit 1 ;;\nesac\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def _env(tmp_path: Path, **variables) -> dict:
    return dict(os.environ, PATH=f"{_slurm_bin(tmp_path)}:{BIN}:{os.environ['PATH']}", MINORSFT=str(BIN / "minorsft"), CONFIG="",
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", SLURM_SUBMIT_DIR=str(REPO),
                **{k: str(v) for k, v in variables.items()})


def test_slurm_array_gives_one_complete_stage_one_output(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, make_records(60, seed=3))
    output = tmp_path / "shards"
    tasks = [
        subprocess.Popen(
            ["bash", str(CLUSTER / "precompute-array.sbatch"),
             "--engine", "hf", "--chunk-rows", "8", "--max-seq-len", "256", "--max-batch-tokens", "1024"],
            env=_env(tmp_path, MODEL=tiny_model_dir, DATA=data, OUTPUT=output, SLURM_ARRAY_JOB_ID=77,
                     SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_TASK_MIN=0, SLURM_ARRAY_TASK_MAX=2,
                     SLURM_ARRAY_TASK_COUNT=3),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for task in range(3)
    ]
    logs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0, 0], logs
    assert [log.splitlines()[0] for log in logs] == [f"minorsft-precompute: worker {i} of 3 (job 77_{i})"
                                                     for i in range(3)]
    scanned = schema.scan_output_dir(output)  # raises unless every chunk of every worker is there
    assert scanned.rows_scored + scanned.rows_rejected == 60
    summaries = [json.loads((output / f"summary-w{i}.json").read_text()) for i in range(3)]
    assert all(s["rows_scored"] > 0 for s in summaries)  # each task did its share


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_job(tmp_path, model, data, output, *flags) -> subprocess.Popen:
    env = _env(tmp_path, MODEL=model, DATA=data, OUTPUT=output, SLURM_JOB_ID=4242,
               SLURM_JOB_NODELIST="localhost", SLURM_NNODES=1, GPUS_PER_NODE=1, RDZV_PORT=_free_port())
    return subprocess.Popen(["bash", str(CLUSTER / "train-multinode.sbatch"), *map(str, flags)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(job: subprocess.Popen, timeout: float) -> str:
    """The job's log once it exits; on a timeout the script, torchrun and its ranks are killed."""
    try:
        return job.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        end_process_tree(job)
        raise


def test_slurm_stage_two_one_node_checkpoints_requeues_and_resumes(tiny_model_dir, tmp_path):
    data = write_stage_one_output(tiny_model_dir, make_records(16), tmp_path / "shards")
    output = tmp_path / "run"
    flags = ["--global-batch-size", 4, "--micro-batch-size", 2, "--dtype", "float32", "--max-steps", 12,
             "--save-steps", 1000]

    job = _train_job(tmp_path, tiny_model_dir, data, output, *flags)
    metrics = output / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while job.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert job.poll() is None, "the run ended before it could be signalled:\n" + job.communicate()[0][-3000:]
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@N sends: the batch shell only
    log = _finish(job, 240)
    assert job.returncode == 0, log[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["exit_code"] == 143, log[-3000:]
    assert 2 <= summary["step"] < 12
    assert (output / "checkpoints" / "latest").read_text().strip() == f"step-{summary['step']:08d}"
    assert (tmp_path / "requeues.log").read_text() == "requeue 4242\n"

    job = _train_job(tmp_path, tiny_model_dir, data, output, *flags)  # the requeued job: same command
    log = _finish(job, 300)
    assert job.returncode == 0, log[-3000:]
    assert f"resuming at step {summary['step']}" in log
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 12
    assert (output / "final" / "config.json").exists()
    assert (tmp_path / "requeues.log").read_text() == "requeue 4242\n"  # completed: not requeued again


def test_slurm_stage_two_exits_with_the_ranks_code_not_torchruns(tiny_model_dir, tmp_path):
    data = tmp_path / "shards"
    data.mkdir()  # no shards at all: unusable input, exit 3 on the rank
    job = _train_job(tmp_path, tiny_model_dir, data, tmp_path / "run", "--global-batch-size", 4)
    log = _finish(job, 240)
    assert "minorsft-train: torchrun exited 1; summary status: failed" in log, log[-3000:]
    assert job.returncode == EXIT_BAD_INPUT
    assert not (tmp_path / "requeues.log").exists()


def test_a_timed_out_launch_leaves_no_process_behind(tmp_path):
    """run_to_end on timeout kills what the command started too, including a child in a
    session of its own (as torchrun starts each rank), not just the command."""
    import psutil
    from train_fixtures import run_to_end

    pid_file = tmp_path / "pids"
    script = f"setsid sleep 300 & echo $! >> {pid_file}; sleep 300 & echo $! >> {pid_file}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        run_to_end(["bash", "-c", script], env=dict(os.environ), timeout=2)
    deadline = time.monotonic() + 10
    pids = [int(pid) for pid in pid_file.read_text().split()]
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids):
        assert time.monotonic() < deadline, f"left running: {pids}"
        time.sleep(0.1)
