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
from minorsft_core.cli import EXIT_BAD_INPUT, app
from minorsft_core.config import TrainConfig, save_config
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


def test_guard_changed_config_on_resume(stage_one, tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    saved = TrainConfig(data=str(stage_one), model=str(tiny_model_dir), output=str(output), global_batch_size=2)
    save_config(dataclasses.replace(saved, lr=1e-3), output / "config.yaml")
    _refused(_train_cli(stage_one, tiny_model_dir, output), "different config", "lr")


def test_plan_steps_from_epochs_or_max_steps():
    from minorsft_core.data import DataError
    from train.run import plan_steps

    config = TrainConfig(data="d", model="m", output="o", global_batch_size=8, epochs=1.5, warmup_ratio=0.1)
    assert plan_steps(config, 100) == (12, 18, 2)  # 12 full batches per epoch, 4 samples dropped
    assert plan_steps(dataclasses.replace(config, max_steps=5), 100) == (12, 5, 1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        plan_steps(config, 7)
