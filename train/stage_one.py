"""The checks a stage-one output directory passes before stage two touches a model,
shared by ``minorsft train`` (``train.run``) and the TRL trainer (``train.trl``), so
both refuse exactly the same inputs with the same messages."""

from __future__ import annotations

import os

from minorsft_core.errors import ContractError
from minorsft_core.schema import ScannedOutput, ShardMetadata, scan_output_dir, tokenizer_fingerprint


def scan_stage_one(data) -> ScannedOutput:
    """A complete, one-run stage-one directory (``scan_output_dir``).

    The metadata checks (complete, one run) are cheap and every rank makes them; the row
    checks read every token, so only global rank 0 makes them: N ranks re-reading the
    data set from a shared filesystem would cost N times the traffic. A refusal on rank
    0 ends the job, as launchers stop all ranks when one fails.
    """
    return scan_output_dir(data, validate_rows=os.environ.get("RANK", "0") == "0")


def check_tokenizer(tokenizer, metadata: ShardMetadata, *, model, data) -> None:
    """Refuse a policy whose tokenizer is not the one stage one rendered ``data`` with."""
    if tokenizer_fingerprint(tokenizer) != metadata.tokenizer_fingerprint:
        raise ContractError(
            f"the policy's tokenizer ({model}) differs from the one stage one used for {data} "
            f"(reference {metadata.reference_model}): vocabulary, special tokens or chat template. The shards' "
            "token ids would mean different text to the policy. Train the model the shards were scored "
            "for, or re-run `minorsft precompute` with this model's tokenizer."
        )
