"""Interrupted `minorsft train` runs, for real: SIGKILL at chosen and at random instants
(one of them inside a checkpoint save), SIGTERM, and resumes on another number of
ranks. After each interruption the same command is run again; in the end the metrics
of every step and the final weights equal one uninterrupted run's.

A kill inside a save is made certain, without a hook in the trainer: before the save
of a later step begins, the test puts a FIFO where one rank's RNG file will go. The
rank's write then blocks in ``open`` until it is killed, after every DeepSpeed file
of that tag is written: the widest window of a save. The FIFO is then removed, so the
directory holds exactly what a kill there leaves (the tag without that RNG file).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_fixtures import REPO, train_command, train_env

from minorsft_core.errors import EXIT_PREEMPTED
from train.metrics import METRIC_KEYS, read_metrics

pytestmark = pytest.mark.slow

STEPS = 10  # 8 samples in global batches of 4: five epochs; each interruption below leaves steps to do
TIMING_KEYS = {"samples_per_s", "tokens_per_s"}
KILL_SEED = 8


def _args(data, policy, output):
    # Micro-batch 2: one process accumulates 2 micro-batches, two ranks 1 each.
    return ["--data", data, "--model", policy, "--output", output, "--global-batch-size", 4, "--micro-batch-size", 2,
            "--max-steps", STEPS, "--lr", 1e-3, "--warmup-ratio", 0, "--dtype", "float32", "--save-steps", 1,
            "--drift-tolerance", 100, "--coef-tolerance", 1]


class _Job:
    """`minorsft train` in its own process group (killed as a whole whatever happens to
    the test), its stderr in a file (a pipe nobody reads could fill and block it)."""

    def __init__(self, args, ranks: int, log: Path):
        self.log = log
        with open(log, "w") as handle:
            self.process = subprocess.Popen(train_command(*args, ranks=ranks), cwd=REPO, env=train_env(), stdout=handle,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=60)

    def signal(self, sig) -> None:
        """``sig`` to the job's process group; a SIGKILL also to every descendant, since
        torchrun starts each rank in a session of its own (left alive, a killed job's ranks
        wait in a collective for the rest of the test session)."""
        import psutil  # a dependency of deepspeed

        descendants = []
        if sig == signal.SIGKILL:
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants = psutil.Process(self.process.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, condition, what: str, timeout: float = 240):
        deadline = time.time() + timeout
        while not (found := condition()):
            assert self.process.poll() is None, f"exited {self.process.returncode} before {what}:\n" \
                                                f"{self.output()[-3000:]}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)
        return found

    def finish(self, timeout: float = 400) -> int:
        return self.process.wait(timeout=timeout)


def _steps_logged(output: Path) -> list[int]:
    return [m["step"] for m in read_metrics(output / "metrics.jsonl")]


def _first_new_step(job: _Job, output: Path) -> int:
    """Wait until the job logged a step of its own; return it. Lines a killed attempt
    logged after its last checkpoint are dropped when the progress bar starts."""
    resumed_at = (_committed(output) or {"step": 0})["step"]
    return job.wait_for(lambda: "train:" in job.output() and max(_steps_logged(output), default=0) > resumed_at
                        and max(_steps_logged(output)), "a step of this run")


def _committed(output: Path) -> dict | None:
    from train import checkpoints

    return checkpoints.committed(output / "checkpoints")


def _kill_inside_a_save(args, output: Path, logs: Path, *, ranks: int, held_rank: int) -> str:
    """Run until ``held_rank`` is inside the save of a step after the first one this run
    logs, SIGKILL the job there; return the tag that save was writing."""
    root = output / "checkpoints"
    fifos = []

    def held_tag():
        for fifo in fifos:
            written = [fifo.parent / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ranks)]
            if all(path.exists() for path in written):
                return fifo.parent.name
        return None

    with _Job(args, ranks, logs / "held.log") as job:
        first = _first_new_step(job, output)  # its start-up clean-up is done
        for step in range(first + 1, STEPS):
            fifo = root / f"step-{step:08d}" / f"rng-rank{held_rank:05d}.pt"
            fifo.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # that save already wrote it: hold a later one
                os.mkfifo(fifo)
                fifos.append(fifo)
        held = job.wait_for(held_tag, "a save to reach a held RNG file")
        time.sleep(1.0)  # nothing but the blocked open comes next: let every rank get there
        assert job.process.poll() is None
        job.signal(signal.SIGKILL)
    for fifo in fifos:
        fifo.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only the held tag has other files
            fifo.parent.rmdir()
    return held


def _kill_at_a_random_instant(args, output: Path, logs: Path, *, ranks: int, rng: random.Random) -> None:
    """SIGKILL the job a seeded random time after it logged its first step: in a step,
    in a save or between them."""
    with _Job(args, ranks, logs / "random.log") as job:
        _first_new_step(job, output)
        time.sleep(rng.uniform(0.0, 0.4))
        job.signal(signal.SIGKILL)


def _sigterm_after_a_step(args, output: Path, logs: Path, *, ranks: int) -> None:
    with _Job(args, ranks, logs / "sigterm.log") as job:
        _first_new_step(job, output)
        job.signal(signal.SIGTERM)  # every rank; each checkpoints at the step boundary
        job.finish()
        summary = json.loads((output / "summary.json").read_text())
        assert summary["status"] == "preempted" and summary["exit_code"] == EXIT_PREEMPTED, job.output()[-3000:]


def _run_to_the_end(args, logs: Path, *, ranks: int) -> str:
    with _Job(args, ranks, logs / f"complete-{ranks}.log") as job:
        assert job.finish() == 0, job.output()[-4000:]
        return job.output()


def _weights(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def _assert_same_run(expected: Path, resumed: Path, tolerance: float) -> None:
    a, b = read_metrics(expected / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b, strict=True):
        for key in set(METRIC_KEYS) - TIMING_KEYS:
            assert y[key] == pytest.approx(x[key], rel=tolerance, abs=1e-9), (y["step"], key)
    w_expected, w_resumed = _weights(expected / "final"), _weights(resumed / "final")
    for key in w_expected:
        torch.testing.assert_close(w_resumed[key], w_expected[key], rtol=0, atol=tolerance)


@pytest.fixture(scope="module")
def uninterrupted(data, policy, tmp_path_factory):
    """One process, never interrupted: what every interrupted run must end equal to."""
    output = tmp_path_factory.mktemp("uninterrupted")
    _run_to_the_end(_args(data, policy, output), tmp_path_factory.mktemp("uninterrupted-logs"), ranks=1)
    return output


def test_killed_anywhere_one_process_then_resumed_on_two_ranks(data, policy, uninterrupted, tmp_path):
    output, logs = tmp_path / "out", tmp_path
    args = _args(data, policy, output)
    held = _kill_inside_a_save(args, output, logs, ranks=1, held_rank=0)
    assert _committed(output)["tag"] < held  # the torn tag was never committed
    _kill_at_a_random_instant(args, output, logs, ranks=1, rng=random.Random(KILL_SEED))
    assert _committed(output)["tag"] >= held or not (output / "checkpoints" / held).exists()  # cleaned up
    _sigterm_after_a_step(args, output, logs, ranks=1)
    written_by = _committed(output)
    assert written_by["world_size"] == 1 and written_by["step"] < STEPS
    assert written_by["zero_stage"] == 2  # the default on one rank
    resumed = _run_to_the_end(args, logs, ranks=2)  # universal conversion: 1 rank's checkpoint on 2
    assert f"resuming at step {written_by['step']}" in resumed and "2 ranks x 1 accumulation" in resumed
    assert "ZeRO-2" in resumed  # the stage follows the checkpoint, not the new rank count
    _assert_same_run(uninterrupted, output, 1e-5)


def test_two_rank_job_killed_inside_a_save_then_resumed_as_one_process(data, policy, uninterrupted, tmp_path):
    output, logs = tmp_path / "out", tmp_path
    args = _args(data, policy, output)
    held = _kill_inside_a_save(args, output, logs, ranks=2, held_rank=1)
    assert _committed(output)["tag"] < held  # rank 0 had written all of its part; still not committed
    _sigterm_after_a_step(args, output, logs, ranks=2)  # the same torchrun command resumes, then stops
    assert _committed(output)["tag"] >= held or not (output / "checkpoints" / held).exists()  # cleaned up
    written_by = _committed(output)
    assert written_by["world_size"] == 2 and written_by["step"] < STEPS
    assert written_by["zero_stage"] == 3  # the default on several ranks
    resumed = _run_to_the_end(args, logs, ranks=1)  # `minorsft train` without a launcher
    assert f"resuming at step {written_by['step']}" in resumed and "1 ranks x 2 accumulation" in resumed
    assert "ZeRO-3" in resumed  # the stage follows the checkpoint, not the new rank count
    _assert_same_run(uninterrupted, output, 1e-5)
