"""MinorSFT inside TRL: stage one's shards as a TRL dataset, and an ``SFTTrainer`` whose
loss is ``minorsft_core.losses`` on each sample's precomputed reference log-prob.

The path through it: ``load_shards`` checks a stage-one directory exactly as
``minorsft train`` does (``train.stage_one``) and returns it as a pre-tokenized
``datasets.Dataset`` that remembers which run wrote it; ``MinorSFTTrainer`` refuses a
tokenizer that differs from that run's, pads batches with ``train.data.batch_records``
(so ``ref_logp_sum`` and ``answer_len`` reach the loss), and computes the loss and the
metrics of ``train.loop``.

Normalisation (the rule of ``train.loop``). transformers (5.17-5.19) counts
``num_items_in_batch`` only for batches with ``labels``, and then counts label *tokens*
(``labels[..., 1:] != -100`` over the accumulation window and, with
``average_tokens_across_devices``, over ranks), never samples. Our losses are
per-sample means, so the batches carry no ``labels``, the count is None, and
``get_batch_samples`` counts the window's samples and answer tokens itself, summed over
ranks. Without a count ``training_step`` divides each micro-batch's loss by the window's
A micro-batches (5.19 spells this ``loss_is_scaled_for_ga = False``; under DeepSpeed it
passes ``scale_wrt_gas=False`` so the engine does not divide again), and DDP, FSDP and
DeepSpeed ZeRO average gradients over the W data-parallel ranks. So a micro-batch's
loss is ``sum_i l_i / (count / (A * W))``: the update's gradient is
``(1 / count) * sum_i grad l_i`` over the global batch whatever A and W are, and the
``loss`` the Trainer logs (per-rank sums averaged over ranks) is the global batch's.

Nothing else in the project imports trl (the optional ``trl`` extra).
"""

from __future__ import annotations

import dataclasses
import json

import torch
from transformers import AutoTokenizer

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # the optional extra
    raise ImportError(f"train.trl needs TRL ({err}): pip install 'minorsft[trl]'") from err

from minorsft_core.config import TrainConfig
from minorsft_core.errors import ConfigError, ContractError, DataError
from minorsft_core.losses import sequence_logps
from minorsft_core.schema import (
    ANSWER_LEN,
    COMPLETION_MASK,
    INPUT_IDS,
    REF_LOGP_SUM,
    SAMPLE_ID,
    ShardMetadata,
)
from train.data import TRAIN_COLUMNS, batch_records, open_shards
from train.ds_ops import prepare_builds
from train.loop import _EXTREMES, _SUMS, _micro_stats, agreement_with_reference, compute_loss, parity_failures
from train.stage_one import check_tokenizer, scan_stage_one

# Where a loaded data set keeps the run metadata of the shards it came from. `datasets`
# carries `info` through select/shuffle/split/map/filter, and merges it on concatenation.
_INFO_PREFIX = "minorsft stage-one output "


class DriftError(RuntimeError):
    """The step-1 guard: the policy is not the reference the shards were scored with."""


def load_shards(path, *, cache_dir=None):
    """A complete stage-one output directory as a pre-tokenized TRL dataset.

    Checked as ``minorsft train`` checks it (complete, one run, every row valid); the
    columns are ``sample_id``, ``input_ids``, ``completion_mask``, ``answer_len`` and
    ``ref_logp_sum``, memory-mapped from an Arrow cache under ``cache_dir`` (default: the
    ``datasets`` cache).
    """
    scanned = scan_stage_one(path)
    dataset = open_shards(scanned, cache_dir, columns=(SAMPLE_ID, *TRAIN_COLUMNS))
    stamp = {"path": str(path), "metadata": json.loads(scanned.metadata.to_json())}
    dataset.info.description = _INFO_PREFIX + json.dumps(stamp)
    return dataset


def shards_metadata(dataset, name: str = "train_dataset") -> tuple[str, ShardMetadata]:
    """``(stage-one path, run metadata)`` of a data set made by ``load_shards``."""
    description = getattr(getattr(dataset, "info", None), "description", None) or ""
    if not description.startswith(_INFO_PREFIX):
        raise ContractError(
            f"{name} does not come from `train.trl.load_shards` (it carries no stage-one metadata): "
            "MinorSFTTrainer needs each sample's ref_logp_sum as stage one scored it. Load the data set with "
            "load_shards(stage_one_output_dir)."
        )
    if description.count(_INFO_PREFIX) > 1:
        raise ContractError(f"{name} concatenates the outputs of several stage-one runs; train on one run's output")
    stamp = json.loads(description[len(_INFO_PREFIX):])
    return stamp["path"], ShardMetadata.from_json(json.dumps(stamp["metadata"]), f"{name} ({stamp['path']})")


def _train_field(name: str):
    """A field of ``MinorSFTConfig`` with the default, help and choices of ``TrainConfig``'s."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    metadata = {"help": f.metadata["help"]}
    if f.metadata.get("choices"):
        metadata["choices"] = list(f.metadata["choices"])
    return dataclasses.field(default=f.default, metadata=metadata)


@dataclasses.dataclass
class MinorSFTConfig(SFTConfig):
    """TRL's ``SFTConfig`` plus the MinorSFT fields, with ``minorsft train``'s defaults
    (the paper's: ``minorsft``, beta 0.04; SFTConfig's lr default is already 2e-5)."""

    loss: str = _train_field("loss")
    beta: float = _train_field("beta")
    token_normalize: bool = _train_field("token_normalize")
    drift_tolerance: float = _train_field("drift_tolerance")
    coef_tolerance: float = _train_field("coef_tolerance")
    # The shards are already tokenized and scored: TRL must neither re-tokenize nor
    # truncate them (a truncated answer no longer matches its ref_logp_sum).
    dataset_kwargs: dict | str | None = dataclasses.field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "must keep skip_prepare_dataset=True: the shards are tokenized and scored as they are"})
    max_length: int | None = dataclasses.field(
        default=None, metadata={"help": "must be None: shards are trained as scored; stage one's --max-seq-len "
                                        "decides the longest sample"})

    def __post_init__(self):
        if self.deepspeed:  # set before TRL starts DeepSpeed, which JIT-builds its ops (train.ds_ops)
            prepare_builds()
        super().__post_init__()
        if self.loss not in ("minorsft", "sft", "dpo_sft"):
            raise ConfigError(f"loss: {self.loss!r} is not one of minorsft, sft, dpo_sft")
        for name in ("beta", "drift_tolerance", "coef_tolerance"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.token_normalize and self.loss != "sft":
            raise ConfigError("token_normalize: only for loss='sft'")
        if not (isinstance(self.dataset_kwargs, dict) and self.dataset_kwargs.get("skip_prepare_dataset")):
            raise ConfigError("dataset_kwargs: must hold skip_prepare_dataset=True; the shards are already tokenized")
        refused = {
            "max_length": (self.max_length is not None, "shards are trained as scored; truncate in stage one "
                           "(`minorsft precompute --max-seq-len N --truncate-answer`)"),
            "packing": (self.packing, "packed rows would lose the per-sample reference columns"),
            "padding_free": (self.padding_free, "the MinorSFT collator pads"),
            "chat_template_path": (self.chat_template_path is not None, "the shards were rendered with the "
                                   "reference's template; another template changes the token ids"),
            "loss_type": (self.loss_type != "nll", "the loss is `loss` (minorsft, sft or dpo_sft)"),
            "label_smoothing_factor": (self.label_smoothing_factor != 0, "not part of the MinorSFT losses"),
        }
        for name, (bad, why) in refused.items():
            if bad:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not supported by MinorSFTTrainer: {why}")


@dataclasses.dataclass
class MinorSFTCollator:
    """Right-pads ``input_ids`` / ``completion_mask`` and passes ``ref_logp_sum`` (float64)
    and ``answer_len`` through, as ``minorsft train`` batches them."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = batch_records({column: [e[column] for e in examples] for column in TRAIN_COLUMNS}, self.pad_token_id)
        inputs = batch.inputs
        return {INPUT_IDS: inputs.input_ids, "attention_mask": inputs.attention_mask,
                COMPLETION_MASK: inputs.completion_mask, ANSWER_LEN: batch.answer_len,
                REF_LOGP_SUM: batch.ref_logp_sum}


@dataclasses.dataclass
class _Window:
    """One optimizer step's micro-batches on this rank, and the global counts of its batch."""

    micro_batches: int
    samples: float  # over all ranks
    answer_tokens: float  # over all ranks
    seen: int = 0
    sums: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(len(_SUMS), dtype=torch.float64))
    extremes: torch.Tensor = dataclasses.field(
        default_factory=lambda: torch.full((len(_EXTREMES),), -float("inf"), dtype=torch.float64))


class MinorSFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` training ``loss`` (minorsft | sft | dpo_sft) on ``load_shards`` data.

    Logs, per logging interval, what ``minorsft train`` writes to ``metrics.jsonl``:
    ``deviation`` (Eq. 8), ``coef_mean`` / ``coef_min`` / ``coef_max`` (Eq. 7's w_i),
    ``policy_logp_per_token``, ``ref_logp_per_token``; TRL logs ``loss``, ``grad_norm``
    and ``learning_rate``. Before the first update it raises ``DriftError`` when the
    step-1 parity guard of ``minorsft train`` refuses (``train.loop.parity_failures``).
    """

    loss_is_scaled_for_ga = False  # training_step divides by A; compute_loss by count / (A * W) (module docstring)

    def __init__(self, model, args: MinorSFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, data_collator=None, **kwargs):
        if not isinstance(args, MinorSFTConfig):
            raise TypeError(f"args must be a MinorSFTConfig, got {type(args).__name__}")
        if data_collator is not None or kwargs.get("compute_loss_func") is not None:
            raise ValueError("MinorSFTTrainer pads its own batches and computes its own loss: pass neither "
                             "data_collator nor compute_loss_func")
        if train_dataset is None:
            raise ValueError("train_dataset is required: load_shards(stage_one_output_dir)")
        # Every check that can refuse runs before the model is loaded (when `model` is a path).
        model_name = model if isinstance(model, str) else model.config._name_or_path
        tokenizer = processing_class or AutoTokenizer.from_pretrained(model_name,
                                                                      trust_remote_code=args.trust_remote_code)
        datasets = {"train_dataset": train_dataset}
        if isinstance(eval_dataset, dict):
            datasets.update({f"eval_dataset[{key!r}]": value for key, value in eval_dataset.items()})
        elif eval_dataset is not None:
            datasets["eval_dataset"] = eval_dataset
        for name, dataset in datasets.items():
            path, metadata = shards_metadata(dataset, name)
            check_tokenizer(tokenizer, metadata, model=model_name, data=path)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise DataError(f"{model_name}: the tokenizer has neither a pad nor an eos token to pad batches with")
        super().__init__(model, args=args, data_collator=MinorSFTCollator(pad_token_id), train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer, **kwargs)
        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and any(getattr(parallelism, f"{kind}_size", 1) > 1 for kind in ("tp", "cp", "sp")):
            raise ValueError("MinorSFTTrainer supports data parallelism only (DDP, FSDP, DeepSpeed ZeRO): "
                             "tensor, context or sequence parallelism splits what sequence_logps needs whole")
        self._window: _Window | None = None
        self._interval: tuple[torch.Tensor, torch.Tensor] | None = None  # (sums, coef extremes) since the last log

    def _set_signature_columns_if_needed(self):
        # `remove_unused_columns` keeps only these: without it the reference columns,
        # which the model's forward does not take, would be dropped before the collator.
        if self._signature_columns is None:
            self._signature_columns = list(TRAIN_COLUMNS)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            local = torch.tensor([[len(b[ANSWER_LEN]), float(b[ANSWER_LEN].sum())] for b in batch_samples],
                                 dtype=torch.float64).sum(0)
            samples, tokens = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum").tolist()
            self._window = _Window(micro_batches=len(batch_samples), samples=samples, answer_tokens=tokens)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, ref_logp_sum, answer_len = inputs[INPUT_IDS], inputs[REF_LOGP_SUM], inputs[ANSWER_LEN]
        outputs = model(input_ids=input_ids, attention_mask=inputs["attention_mask"], use_cache=False)
        policy_logps = sequence_logps(outputs.logits, input_ids, inputs[COMPLETION_MASK])
        if not self.model.training:  # evaluation: this batch's own mean
            loss = compute_loss(self.args, policy_logps, ref_logp_sum, answer_len, None)
        else:
            window = self._window
            count = window.answer_tokens if self.args.token_normalize else window.samples
            loss = compute_loss(self.args, policy_logps, ref_logp_sum, answer_len,
                                count / (window.micro_batches * self.accelerator.num_processes))
            self._record(window, loss, policy_logps, ref_logp_sum, answer_len)
        return (loss, outputs) if return_outputs else loss

    def _record(self, window: _Window, loss, policy_logps, ref_logp_sum, answer_len) -> None:
        """Add a micro-batch to the window's metrics; at the window's last micro-batch (before
        its backward) reduce them over ranks, and at the first update apply the guard."""
        sums, extremes = _micro_stats(self.args, loss, policy_logps, ref_logp_sum, answer_len)  # on the device
        window.sums = window.sums.to(sums.device) + sums
        window.extremes = torch.maximum(window.extremes.to(extremes.device), extremes)
        window.seen += 1
        if window.seen < window.micro_batches:
            return
        device = self.accelerator.device
        total = self.accelerator.reduce(window.sums.to(device), reduction="sum").cpu()
        extremes = self.accelerator.gather(window.extremes.to(device)[None]).amax(0).cpu()
        if self.state.global_step == 0:
            agreement = agreement_with_reference(dict(zip(_SUMS, total.tolist(), strict=True)),
                                                 dict(zip(_EXTREMES, extremes.tolist(), strict=True)))
            failures = parity_failures(self.args, agreement)
            if failures:
                raise DriftError(
                    f"step 1: the policy disagrees with stage one's reference ({'; '.join(failures)}); stopped "
                    "before the first update. With the policy initialised from the reference this only measures "
                    "how differently the stages score the same samples. Likely causes: the model is not the "
                    "reference the shards were scored with, or a dtype mismatch between the stages. If the "
                    "policy deliberately differs from the reference, raise drift_tolerance and coef_tolerance."
                )
        if self._interval is None:
            self._interval = (total, extremes)
        else:
            self._interval = (self._interval[0] + total, torch.maximum(self._interval[1], extremes))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._interval is not None and self.model.training:
            total = dict(zip(_SUMS, self._interval[0].tolist(), strict=True))
            logs.update(
                **agreement_with_reference(total, dict(zip(_EXTREMES, self._interval[1].tolist(), strict=True))),
                policy_logp_per_token=total["policy_logp"] / total["answer_tokens"],
                ref_logp_per_token=total["ref_logp"] / total["answer_tokens"],
            )
            self._interval = None
        super().log(logs, start_time)
