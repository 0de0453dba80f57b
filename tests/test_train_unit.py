"""Stage two without DeepSpeed running: the data plan, the loss normaliser against a
fake split over ranks and micro-batches, the lr schedule, and every input guard
(each refuses before any accelerator work)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_records
from train_fixtures import write_stage_one_output
from typer.testing import CliRunner

from minorsft_core import losses, schema
from minorsft_core.cli import app
from minorsft_core.config import TrainConfig
from minorsft_core.errors import EXIT_BAD_INPUT, EXIT_USAGE
from train.data import Layout, epoch_batches, padding_fraction, split_global_batch
from train.loop import compute_loss, normalizer

# ---- data plan ----------------------------------------------------------------------------


def test_epoch_batches_deterministic_complete_and_length_grouped():
    lengths = np.random.default_rng(0).integers(5, 500, size=1003)
    batches = epoch_batches(lengths, 16, seed=3, epoch=0)
    assert len(batches) == 1003 // 16 and all(len(b) == 16 for b in batches)
    rows = np.concatenate(batches)
    assert len(set(rows.tolist())) == len(rows)  # no row twice; the remainder is dropped
    again = epoch_batches(lengths, 16, seed=3, epoch=0)
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))
    assert not all((a == b).all() for a, b in zip(batches, epoch_batches(lengths, 16, seed=3, epoch=1), strict=True))
    layout = Layout(16, 2, 2)
    grouped = np.mean([padding_fraction(split_global_batch(b, lengths, layout), lengths) for b in batches])
    shuffled = np.random.default_rng(1).permutation(rows).reshape(-1, 16)
    unsorted = np.mean([
        padding_fraction([[b[k:k + 2] for k in range(r * 2, 16, 4)] for r in range(2)], lengths) for b in shuffled
    ])
    assert grouped < 0.1 < unsorted


def test_split_covers_the_global_batch_once_whatever_the_layout():
    lengths = np.arange(1, 33)
    rows = np.arange(32)
    for micro, world in [(1, 1), (2, 2), (4, 1), (8, 4), (16, 2)]:
        plan = split_global_batch(rows, lengths, Layout(32, micro, world))
        assert len(plan) == world and all(len(micros) == 32 // (micro * world) for micros in plan)
        assert sorted(np.concatenate([m for micros in plan for m in micros]).tolist()) == rows.tolist()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("budget, world", [(10, 1), (64, 1), (64, 2), (100, 4), (10**6, 2)])
def test_token_budget_micro_batches_fit_the_budget_and_cover_the_batch_once(budget, world, packed):
    """Short samples share a micro-batch, long ones get their own; every rank runs as many
    forwards (ZeRO-3 needs it); a micro-batch over budget holds one sample only."""
    lengths = np.random.default_rng(0).integers(2, 70, size=32)
    rows = np.random.default_rng(1).permutation(32)
    plan = split_global_batch(rows, lengths, Layout(32, 1, world, max_tokens=budget, packed=packed))
    micros = [m for per_rank in plan for m in per_rank]
    assert len(plan) == world and len({len(per_rank) for per_rank in plan}) == 1
    assert sorted(np.concatenate(micros).tolist()) == list(range(32))
    cost = [int(lengths[m].sum()) if packed else int(lengths[m].max()) * len(m) for m in micros]
    assert all(c <= budget or len(m) == 1 for c, m in zip(cost, micros, strict=True))
    if budget >= 64:
        assert max(len(m) for m in micros) > 1
    if budget == 10**6:
        assert len(micros) == world


def test_layout_refuses_a_global_batch_the_ranks_cannot_split():
    with pytest.raises(ValueError, match="not a multiple"):
        Layout(12, 4, 2)


# ---- normalisation ------------------------------------------------------------------------


@pytest.mark.parametrize("loss, token_normalize", [("minorsft", False), ("sft", False), ("sft", True),
                                                   ("dpo_sft", False)])
def test_normalizer_makes_split_gradient_equal_full_batch(loss, token_normalize, tmp_path):
    """Emulate DeepSpeed as the loop drives it (no division by accumulation steps,
    gradients averaged over W ranks). Whatever the split (fixed micro-batches, or token
    budgets of varying sample counts, padded or packed) the summed gradient and logged
    loss equal the full-batch SPEC §2 mean."""
    config = TrainConfig(data="d", model="m", output="o", loss=loss, token_normalize=token_normalize)
    gen = torch.Generator().manual_seed(0)
    n = 8
    answer_len_np = np.array([3, 17, 5, 40, 1, 9, 22, 6])
    lengths = answer_len_np + 10
    answer_len = torch.tensor(answer_len_np, dtype=torch.float32)
    policy = (-answer_len * (1 + torch.rand(n, generator=gen))).double().requires_grad_()
    ref = policy.detach() + torch.randn(n, generator=gen, dtype=torch.float64) * 5
    rows = np.arange(n)

    full = compute_loss(config, policy, ref, answer_len, normalizer(config, rows, answer_len_np, Layout(n, n, 1)))
    (full_grad,) = torch.autograd.grad(full, policy)

    for layout in (Layout(n, micro=2, world=2), Layout(n, micro=1, world=1, max_tokens=60, packed=True),
                   Layout(n, micro=1, world=2, max_tokens=60), Layout(n, micro=1, world=2, max_tokens=500)):
        plan = split_global_batch(rows, lengths, layout)
        sizes = sorted(len(m) for micros in plan for m in micros)
        assert len({len(micros) for micros in plan}) == 1  # every rank runs as many forwards
        norm = normalizer(config, rows, answer_len_np, layout)
        grad = torch.zeros(n, dtype=torch.float64)
        logged = 0.0
        for micros in plan:
            for micro_rows in micros:
                idx = torch.as_tensor(micro_rows)
                micro_loss = compute_loss(config, policy[idx], ref[idx], answer_len[idx], norm)
                (g,) = torch.autograd.grad(micro_loss, policy)
                grad += g / layout.world
                logged += micro_loss.item()
        torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-15, msg=str((layout, sizes)))
        assert logged / layout.world == pytest.approx(full.item(), rel=1e-12)
    if token_normalize:
        expected = -policy.detach().sum() / answer_len.sum()
    elif loss == "sft":
        expected = losses.sft_loss(policy.detach(), answer_len)
    else:
        expected = full.detach()
    assert full.item() == pytest.approx(expected.item(), rel=1e-12)


def test_linear_schedule_warms_up_then_decays():
    from train.engine import linear_schedule

    def lrs(total, warmup):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=1.0)
        scheduler = linear_schedule(total, warmup)(optimizer)
        out = []
        for _ in range(total):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    assert lrs(4, 0) == pytest.approx([1.0, 0.75, 0.5, 0.25])  # no warm-up: the first update at peak
    assert lrs(10, 2) == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


# ---- guards (before any accelerator work) -------------------------------------------------


@pytest.fixture(scope="module")
def stage_one(tiny_model_dir, tmp_path_factory):
    """A complete two-chunk stage-one output, with rejects."""
    return write_stage_one_output(tiny_model_dir, make_records(10), tmp_path_factory.mktemp("shards"),
                                  chunk_rows=6, rejected_rows=2)


def _train_cli(data, model, output):
    return CliRunner().invoke(app, ["train", "--data", str(data), "--model", str(model), "--output", str(output),
                                    "--global-batch-size", "2"])


def _copy(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _refused(result, *phrases):
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    for phrase in phrases:
        assert phrase in result.output


def test_guard_incomplete_directory(stage_one, tiny_model_dir, tmp_path):
    data = _copy(stage_one, tmp_path / "data")
    schema.shard_path(data, 1).unlink()
    _refused(_train_cli(data, tiny_model_dir, tmp_path / "out"), "incomplete", "re-run the same `minorsft precompute`")
    # Refused before any work: the output holds only the summary a batch script branches on.
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["summary.json"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == EXIT_BAD_INPUT
    assert "incomplete" in summary["reason"]


def test_guard_mixed_references(stage_one, tiny_model_dir, tmp_path):
    data = _copy(stage_one, tmp_path / "data")
    other = write_stage_one_output(tiny_model_dir, make_records(10), tmp_path / "other", chunk_rows=6,
                                   rejected_rows=2, reference_fingerprint="another-model")
    schema.shard_path(data, 1).write_bytes(schema.shard_path(other, 1).read_bytes())
    _refused(_train_cli(data, tiny_model_dir, tmp_path / "out"), "different stage-one run", "reference_fingerprint")


def test_guard_tokenizer_mismatch(stage_one, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    policy = _copy(tiny_model_dir, tmp_path / "policy")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.chat_template = tokenizer.chat_template.replace("You are a helpful assistant.", "Be brief.")
    tokenizer.save_pretrained(policy)
    _refused(_train_cli(stage_one, policy, tmp_path / "out"), "tokenizer", "re-run `minorsft precompute`")


def _committed_checkpoint(output, config, scanned, step=3):
    """``output`` as a run that committed a checkpoint at ``step`` (its record only)."""
    from train import checkpoints
    from train.run import resume_record

    root = output / "checkpoints"
    (root / checkpoints.tag_name(step)).mkdir(parents=True)
    checkpoints.commit(root, checkpoints.tag_name(step),
                       {**resume_record(config, scanned), "step": step, "world_size": 2, "zero_stage": 3})


def _saved_config(data, model, output, **changes):
    return dataclasses.replace(TrainConfig(data=str(data), model=str(model), output=str(output), global_batch_size=2),
                               **changes)


def test_resume_refuses_a_change_of_what_is_trained(stage_one, tiny_model_dir, tmp_path):
    from train.stage_one import scan_stage_one

    output = tmp_path / "out"
    _committed_checkpoint(output, _saved_config(stage_one, tiny_model_dir, output, lr=1e-3), scan_stage_one(stage_one))
    result = _train_cli(stage_one, tiny_model_dir, output)
    assert result.exit_code == EXIT_USAGE, result.output
    assert "lr: 0.001 != 2e-05" in result.output and "use a new --output" in result.output
    assert json.loads((output / "summary.json").read_text())["exit_code"] == EXIT_USAGE


def test_resume_allows_changes_of_how_it_is_trained(stage_one, tiny_model_dir, tmp_path):
    """What the docs tell a user to change after an OOM or a parity stop, and the world
    size (not a field), may change on resume."""
    from train.run import check_resume
    from train.stage_one import scan_stage_one

    output, scanned = tmp_path / "out", scan_stage_one(stage_one)
    _committed_checkpoint(output, _saved_config(stage_one, tiny_model_dir, output), scanned)
    check_resume(_saved_config(stage_one, tiny_model_dir, output, micro_batch_size=2, gradient_checkpointing=True,
                               drift_tolerance=0.5, coef_tolerance=1.0, save_steps=7, save_total_limit=5,
                               logp_head="logits", attn_implementation="eager", tensorboard=True), scanned)


def test_resume_refuses_regenerated_shards(stage_one, tiny_model_dir, tmp_path):
    from train.stage_one import scan_stage_one

    data, output = _copy(stage_one, tmp_path / "data"), tmp_path / "out"
    _committed_checkpoint(output, _saved_config(data, tiny_model_dir, output), scan_stage_one(data))
    # Stage one run again into the same directory, scoring with another reference.
    write_stage_one_output(tiny_model_dir, make_records(10), data, chunk_rows=6, rejected_rows=2,
                           reference_fingerprint="another-reference")
    result = _train_cli(data, tiny_model_dir, output)
    assert result.exit_code == EXIT_USAGE, result.output
    assert "re-generated since" in result.output and "reference_fingerprint" in result.output


def test_failure_summary_replaces_the_file_atomically(tmp_path):
    """Written to a new file renamed over the old one, never truncated in place: a kill
    mid-write leaves the previous summary whole (the old inode keeps its content)."""
    from train.run import _record_failure

    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"status": "preempted", "exit_code": 143}))
    before = tmp_path / "before.json"
    before.hardlink_to(summary)
    _record_failure(_saved_config("d", "m", tmp_path), EXIT_BAD_INPUT, ValueError("bad"))
    assert json.loads(summary.read_text())["status"] == "failed"
    assert json.loads(before.read_text())["status"] == "preempted"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_only_the_committed_checkpoint_is_loaded_and_leftovers_are_removed(tmp_path):
    from train import checkpoints

    root = tmp_path / "checkpoints"
    assert checkpoints.committed(root) is None
    for step in (1, 2, 3):
        (root / checkpoints.tag_name(step)).mkdir(parents=True)
        checkpoints.commit(root, checkpoints.tag_name(step), {"step": step})
        checkpoints.rotate(root, keep=2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000003"]
    # A save killed before its commit: files of step 4, a half-written `latest`.
    (root / "step-00000004").mkdir()
    (root / "step-00000004" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"partial")
    (root / ".latest.tmp-123").write_text("step-00000004")
    assert checkpoints.committed(root) == {"step": 3, "tag": "step-00000003"}
    checkpoints.remove_uncommitted(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003"]


def test_plan_steps_from_epochs_or_max_steps():
    from minorsft_core.errors import DataError
    from train.run import plan_steps

    config = TrainConfig(data="d", model="m", output="o", global_batch_size=8, epochs=1.5, warmup_ratio=0.1)
    assert plan_steps(config, 100) == (12, 18, 2)  # 12 full batches per epoch, 4 samples dropped
    assert plan_steps(dataclasses.replace(config, max_steps=5), 100) == (12, 5, 1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        plan_steps(config, 7)


def test_cuda_arch_list_is_made_parseable_for_deepspeeds_jit_build(monkeypatch):
    """Hopper images set TORCH_CUDA_ARCH_LIST=9.0a; DeepSpeed 0.19's JIT builder cannot parse
    it and the first GPU run dies building fused Adam (seen on an H200). The trainer hands
    DeepSpeed a list it parses, keeping +PTX and dropping duplicates."""
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    from train.engine import deepspeed_arch_list

    class Probe(CUDAOpBuilder):
        NAME = "probe"

        def __init__(self):
            super().__init__(name=self.NAME)

        def sources(self):
            return []

        def absolute_name(self):
            return self.NAME

    probe = Probe()
    probe.jit_mode = True
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0a+PTX")
    with pytest.raises(ValueError, match="0a"):
        probe.compute_capability_args()
    assert deepspeed_arch_list("8.0 9.0a+PTX") == "8.0;9.0+PTX"
    assert deepspeed_arch_list("9.0;9.0a") == "9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", deepspeed_arch_list("8.0 9.0a+PTX"))
    probe.compute_capability_args()  # parses


def test_resume_refuses_another_zero_stage_on_any_world_size():
    from minorsft_core.config import ConfigError
    from train.run import _check_resumable_layout

    zero3_on_2 = {"tag": "step-00000004", "zero_stage": 3, "world_size": 2}
    _check_resumable_layout(zero3_on_2, 3)
    _check_resumable_layout({**zero3_on_2, "zero_stage": 2}, 2)  # on any world size: the universal format
    with pytest.raises(ConfigError, match="written with ZeRO-3, this run uses ZeRO-2"):
        _check_resumable_layout(zero3_on_2, 2)
    with pytest.raises(ConfigError, match="written with ZeRO-2, this run uses ZeRO-3"):
        _check_resumable_layout({**zero3_on_2, "zero_stage": 2}, 3)


@pytest.mark.parametrize(("world", "resumed", "stage"), [(1, None, 2), (2, None, 3), (8, None, 3), (1, 3, 3),
                                                         (4, 2, 2)])
def test_default_stage_is_two_on_one_rank_three_on_several_and_a_checkpoints_on_resume(world, resumed, stage):
    from minorsft_core.config import default_zero_stage

    assert default_zero_stage(world, resumed) == stage

# ---- DeepSpeed's JIT-built op ---------------------------------------------------------------


def test_op_builds_go_into_the_environment_unless_the_user_chose(monkeypatch, tmp_path):
    import sys

    from train.ds_ops import use_environment_build_dir

    # setenv first so that monkeypatch restores the variable's state, unset included: the
    # function sets it, and a leak would make every later trainer child of this pytest
    # process rebuild DeepSpeed's op into tmp_path (minutes of CPU).
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "unset-below")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert use_environment_build_dir() == tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    assert str(use_environment_build_dir()) == "/elsewhere"


def test_op_builds_run_the_environments_own_ninja_whatever_the_callers_path(monkeypatch, tmp_path):
    """The system's ninja and the environment's write incompatible build logs, so a
    switch between them rebuilds DeepSpeed's op from scratch (seen twice in one CI run).
    With a ninja in ``sys.prefix/bin`` that one comes first on PATH, once; without one,
    PATH is left as it was."""
    import os
    import shutil
    import sys

    from train.ds_ops import use_environment_ninja

    system = tmp_path / "system-bin"
    for directory in (system, tmp_path / "env" / "bin"):
        directory.mkdir(parents=True)
        (directory / "ninja").write_text("#!/bin/sh\n")
        (directory / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", str(system))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))
    use_environment_ninja()
    use_environment_ninja()
    assert os.environ["PATH"].split(os.pathsep) == [str(tmp_path / "env" / "bin"), str(system)]
    assert shutil.which("ninja") == str(tmp_path / "env" / "bin" / "ninja")
    monkeypatch.setenv("PATH", str(system))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "no-ninja-here"))
    use_environment_ninja()
    assert os.environ["PATH"] == str(system)


def test_a_killed_builds_lock_is_removed_and_a_live_one_waited_for(tmp_path):
    """A lock in a build directory nothing has written to for longer than a build's
    pause is a killed build's: removed with a message (before: waited on forever, in
    silence). A lock with recent writes is waited for, and the wait is announced."""
    import os
    import threading
    import time

    from train.ds_ops import wait_for_build_lock

    said = []
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("lock", "build.ninja", "shm.o"):
        (killed / name).write_text("")
        os.utime(killed / name, (time.time() - 3600, time.time() - 3600))
    wait_for_build_lock(killed, stale_after_s=300, say=said.append)
    assert not (killed / "lock").exists() and "killed build" in said[0]

    said.clear()
    live = tmp_path / "live"
    live.mkdir()
    (live / "lock").write_text("")
    threading.Timer(0.5, (live / "lock").unlink).start()  # the other build finishes
    started = time.monotonic()
    wait_for_build_lock(live, stale_after_s=300, poll_s=0.05, say=said.append)
    assert time.monotonic() - started >= 0.4
    assert len(said) == 1 and "waiting for another process's build" in said[0] and str(live / "lock") in said[0]


def _toolkit(root, release: str):
    """A CUDA toolkit directory whose ``bin/nvcc --version`` prints what NVIDIA's prints."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    f"echo 'Cuda compilation tools, release {release}, V{release}.41'\n")
    nvcc.chmod(0o755)
    return str(root)


def test_gpu_optimizer_build_refused_up_front_without_a_matching_nvcc(tmp_path):
    """On a GPU, DeepSpeed compiles its fused Adam with nvcc once the model is loaded; the
    preflight says beforehand, naming what is missing and the fixes, when that load
    would fail: no toolkit (torch links against it even for a cached build), or, when the
    op must be compiled, no runnable nvcc or another major CUDA than torch's."""
    from functools import partial

    from train.ds_ops import fused_adam_problem

    to_build = partial(fused_adam_problem, torch_cuda="12.8", prebuilt=False, built=False)
    fixes = ("CUDA 12.x toolkit", "CUDA_HOME", "DS_BUILD_FUSED_ADAM=1")
    missing = to_build(cuda_home=None)
    assert "no CUDA toolkit found" in missing and all(fix in missing for fix in fixes)
    no_nvcc = to_build(cuda_home=str(tmp_path / "empty"))
    assert str(tmp_path / "empty" / "bin" / "nvcc") in no_nvcc and all(fix in no_nvcc for fix in fixes)
    other_major = to_build(cuda_home=_toolkit(tmp_path / "cuda-13.0", "13.0"))
    assert "is CUDA 13.0, torch was built with CUDA 12.8" in other_major and all(fix in other_major for fix in fixes)
    # What loads: the same major (torch only warns about the minor); an op built before
    # (no nvcc runs, but torch still links against CUDA_HOME); a prebuilt op; a CPU torch.
    assert to_build(cuda_home=_toolkit(tmp_path / "cuda-12.4", "12.4")) is None
    assert to_build(cuda_home=str(tmp_path / "empty"), built=True) is None
    assert "no CUDA toolkit found" in to_build(cuda_home=None, built=True)
    assert to_build(cuda_home=None, prebuilt=True) is None
    assert to_build(cuda_home=None, torch_cuda=None) is None


def test_gpu_optimizer_check_reads_a_real_nvcc():
    """The version check on the machine's own CUDA toolkit, when it has one."""
    import shutil
    import subprocess
    from pathlib import Path

    from train.ds_ops import fused_adam_problem

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    cuda_home = str(Path(nvcc).resolve().parent.parent)
    release = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.split("release ")[1]
    major = int(release.split(".")[0])
    assert fused_adam_problem(cuda_home=cuda_home, torch_cuda=f"{major}.0", prebuilt=False, built=False) is None
    assert f"torch was built with CUDA {major + 1}.0" in fused_adam_problem(
        cuda_home=cuda_home, torch_cuda=f"{major + 1}.0", prebuilt=False, built=False)


def test_a_killed_gpu_optimizer_build_does_not_hold_up_the_next_run(monkeypatch, tmp_path):
    """A GPU job preempted while compiling fused Adam leaves the op's lock behind; the
    next run's set-up removes it like the CPU op's, instead of waiting forever."""
    import os
    import time

    from train.ds_ops import FUSED_ADAM_OP, prepare_builds

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after: prepare_builds may prepend the venv
    op_dir = tmp_path / FUSED_ADAM_OP
    op_dir.mkdir()
    for name in ("lock", "build.ninja", "multi_tensor_adam.cuda.o"):
        (op_dir / name).write_text("")
        os.utime(op_dir / name, (time.time() - 3600, time.time() - 3600))
    prepare_builds()
    assert not (op_dir / "lock").exists()


def _wait_behind_slow_rank_zero(rank: int, init_file: str, through_io_barrier: bool, results) -> None:
    """One of two gloo ranks whose collectives time out after 2 s; rank 0 first does 6 s
    of "file work", then both meet at a barrier."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from train.engine import io_barrier, io_wait_group

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=2))
    group = io_wait_group(timedelta(seconds=60))
    if rank == 0:
        time.sleep(6)
    try:
        io_barrier(group) if through_io_barrier else dist.barrier()
        results.put((rank, "met"))
    except Exception as error:  # noqa: BLE001 - reported to the test
        results.put((rank, f"{type(error).__name__}: {error}"))


@pytest.mark.parametrize("through_io_barrier", [True, False], ids=["io_barrier", "plain-barrier"])
def test_ranks_wait_out_rank_zeros_file_work_longer_than_the_collective_timeout(tmp_path, through_io_barrier):
    """Rank 0 alone converts a checkpoint, builds the data cache or writes the final model
    while the others wait; on a real model that can outlast the collectives' timeout
    (10 min by default), which would kill every requeued job that resumes on another
    world size. ``io_barrier`` waits on a gloo group with its own timeout: here 6 s of
    rank-0 work against a 2 s collective timeout. Negative control: a plain barrier
    times out."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_wait_behind_slow_rank_zero,
                             args=(rank, str(tmp_path / "init"), through_io_barrier, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    outcome = dict(results.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    if through_io_barrier:
        assert outcome == {0: "met", 1: "met"}
    else:
        assert "timed out" in outcome[1].lower(), outcome  # rank 1 gave up waiting for rank 0


def test_a_group_of_one_chooses_another_port_when_its_port_is_taken(tmp_path):
    """`minorsft train` run directly picks a free port for its one-rank group; another
    process can take it before the group listens (two trainers starting side by side).
    Here a listening socket really holds the first port chosen: the group comes up on
    the next one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "group_of_one.py"
    script.write_text(
        "import socket, sys\n"
        "import train.engine as engine\n"
        "held = socket.socket(); held.bind(('127.0.0.1', 0)); held.listen()\n"
        "ports = iter([held.getsockname()[1]])\n"
        "free = engine._free_port\n"
        "engine._free_port = lambda: next(ports, None) or free()\n"
        "rank, world, device = engine.init_distributed()\n"
        "print('group', rank, world, device, 'held', held.getsockname()[1])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "group 0 1 cpu held" in result.stdout
    held = result.stdout.split()[-1]
    assert f"port {held} was taken before the group could listen on it" in result.stderr
