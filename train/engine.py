"""Everything DeepSpeed, behind a few functions: the only module of the project that
imports it.

- ``init_distributed``: one process with no launcher environment becomes a one-rank
  group; under ``torchrun`` or the ``deepspeed`` launcher the ranks come from the
  environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
- ``ds_config``: the DeepSpeed JSON built from ``TrainConfig`` (or the user's JSON with
  its batch, precision and optimizer keys set from it).
- ``load_policy`` / ``load_reference``: ZeRO-3 partitioned loading (transformers'
  ``HfDeepSpeedConfig`` must exist before ``from_pretrained`` so no rank ever holds
  the whole model), wrapped in ``AnswerLogps`` (the engine's forward returns the
  ``[B]`` answer log-probs), then ``deepspeed.initialize``.
- checkpoints (DeepSpeed's, plus per-rank RNG state), committed atomically (see
  ``train.checkpoints``) and resumable on another world size through DeepSpeed's
  universal format; the final HF directory gathered from the partitions.
- ``io_barrier``: where ranks wait on file-system work (rank 0 building the data cache,
  converting or committing a checkpoint, writing the final model; every rank writing
  its partition), which on a real model can outlast the collectives' timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch

# Without a GPU DeepSpeed must be told to use its CPU accelerator before it is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from minorsft_core import attention  # noqa: E402
from minorsft_core.logp_head import AnswerLogps  # noqa: E402
from train import checkpoints  # noqa: E402
from train.ds_ops import prepare_builds  # noqa: E402

ON_GPU = torch.cuda.is_available()
# DeepSpeed 0.19 calls collectives that torch 2.13 deprecates: one warning per
# micro-step would drown the progress bar and the real warnings.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


# How long ranks wait at an ``io_barrier``. The collectives' own timeout (DeepSpeed's
# default, 10 min, or DEEPSPEED_TIMEOUT) is sized for work every rank does together; one
# rank converting a 7B checkpoint to the universal format reads and writes ~170 GB, and
# fsyncing or writing a checkpoint on a network file system can take as long.
IO_WAIT_TIMEOUT = timedelta(hours=4)
_io_group = None  # the gloo group of io_barrier, made by init_distributed


def io_wait_group(timeout: timedelta = IO_WAIT_TIMEOUT):
    """A gloo group of every rank with a timeout of its own (a collective: every rank
    calls it, in the same order). Gloo, also beside NCCL: a wait on the host needs no
    device, and no NCCL collective is left pending for its watchdog to time out."""
    return dist.new_group(backend="gloo", timeout=timeout)


def io_barrier(group=None) -> None:
    """A barrier for waits on file-system work, through ``io_wait_group``: it outlasts the
    collectives' timeout (``IO_WAIT_TIMEOUT``). If a rank dies meanwhile, torchrun stops
    the others."""
    dist.barrier(group=group or _io_group)


def deepspeed_arch_list(arch_list: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` as DeepSpeed 0.19's JIT builder can parse it.

    Its ``compute_capability_args`` reads every entry as ``int.int[+PTX]``, so an
    architecture-specific entry such as Hopper's ``9.0a`` (set by many CUDA images)
    stops the build of its fused Adam with ``invalid literal for int(): '0a'`` (seen on
    an H200 with torch 2.11 + CUDA 13). Its kernels need no ``a`` features: ``9.0a``
    becomes ``9.0``; other entries are kept."""
    entries = [entry for entry in arch_list.replace(" ", ";").split(";") if entry]
    kept = []
    for entry in entries:
        number, ptx, _ = entry.partition("+PTX")
        number = number.rstrip("abcdefghijklmnopqrstuvwxyz")
        fixed = number + (ptx or "")
        if fixed not in kept:
            kept.append(fixed)
    return ";".join(kept)


def _create_group_of_one(backend: str, attempts: int = 5) -> None:
    """A one-rank group on a free local port. The port is free when chosen, but another
    process can take it before the group's store listens on it (two trainers starting
    side by side hit ``EADDRINUSE``); then choose another."""
    for attempt in range(1, attempts + 1):
        os.environ["MASTER_PORT"] = str(_free_port())
        try:
            deepspeed.init_distributed(dist_backend=backend)
            return
        except dist.DistNetworkError as error:
            if "EADDRINUSE" not in str(error) or attempt == attempts:
                raise
            print(f"minorsft: port {os.environ['MASTER_PORT']} was taken before the group could listen on it; "
                  "choosing another", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, alone, create) the process group; return ``(rank, world_size, device)``."""
    alone = "RANK" not in os.environ
    if alone:
        # `minorsft train` run directly: a group of one, so the same code path (ZeRO-3,
        # collectives) runs everywhere.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if ON_GPU:
        torch.cuda.set_device(local_rank)
        if os.environ.get("TORCH_CUDA_ARCH_LIST"):  # read by DeepSpeed's JIT build of fused Adam
            os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    prepare_builds()  # on CPU the group's set-up JIT-builds DeepSpeed's communication op
    backend = "nccl" if ON_GPU else "gloo"
    if alone:
        _create_group_of_one(backend)
    else:
        deepspeed.init_distributed(dist_backend=backend)
    global _io_group
    _io_group = io_wait_group()
    release_shared_memory_names()
    device = torch.device("cuda", local_rank) if ON_GPU else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def shm_buffer(rank: int) -> Path:
    """The shared-memory file of ``rank``'s all-reduce workspace, named as DeepSpeed 0.19's
    CPU communication op names it (``shm_initialize``: uid, master address and port, rank)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shared_memory_names() -> None:
    """On CPU under the ``deepspeed`` launcher (which sets ``LOCAL_SIZE``), DeepSpeed's
    communication op gives each rank a 69 MB shared-memory workspace (``shm_buffer``),
    maps every peer's, and never unlinks them: each run left them in ``/dev/shm``, in RAM,
    until the machine rebooted. Once every rank has mapped every peer's (the barrier:
    DeepSpeed's set-up returns only then), the names serve nothing; unlinked, the memory
    goes with the last process, however the job ends. A collective."""
    if ON_GPU or os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return
    io_barrier()
    shm_buffer(dist.get_rank()).unlink(missing_ok=True)


def ds_config(config, *, micro: int, accumulation: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed config of the policy. The user's ``--deepspeed`` JSON keeps its ZeRO
    and offload settings; batch sizes, precision, clipping and optimizer always come from
    ``config`` so the two can never disagree."""
    base = json.loads(Path(config.deepspeed).read_text()) if config.deepspeed else {}
    zero = base.setdefault("zero_optimization", {})
    if config.zero_stage not in (2, 3):
        raise ValueError(f"zero_stage {config.zero_stage!r}: train.run resolves it to 2 or 3 before the engine")
    zero["stage"] = config.zero_stage  # train.run.resolve_options has checked it against the JSON's
    if zero["stage"] == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    base.update(
        train_batch_size=config.global_batch_size,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        gradient_clipping=config.max_grad_norm,
        bf16={"enabled": dtype == torch.bfloat16},
        fp16={"enabled": False},
        steps_per_print=10**9,  # metrics.jsonl is the log; DeepSpeed's own would duplicate it
        optimizer={"type": "AdamW", "params": {
            "lr": config.lr, "betas": [config.adam_beta1, config.adam_beta2], "eps": 1e-8,
            "weight_decay": config.weight_decay,
            # DeepSpeed's fused Adam is a CUDA kernel; torch's AdamW is the CPU path.
            "torch_adam": not ON_GPU,
        }},
    )
    base.pop("scheduler", None)  # ours: see linear_schedule
    if dtype == torch.bfloat16:
        # Sum micro-batch gradients in fp32: 8 bf16 additions lose ~3 bits of the
        # gradient. A user JSON may still say otherwise explicitly.
        base.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    return base


def reference_ds_config(policy_config: dict) -> dict:
    """A frozen model's config: same precision, no optimizer; ZeRO-3 partitions it as it
    does the policy. Under ZeRO-2 (which partitions only gradients and optimizer states,
    and which DeepSpeed refuses without an optimizer) each rank holds it whole: stage 0."""
    keep = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16",
            "fp16", "zero_optimization", "steps_per_print")
    frozen = {key: policy_config[key] for key in keep if key in policy_config}
    if frozen["zero_optimization"]["stage"] != 3:
        frozen["zero_optimization"] = {"stage": 0}
    return frozen


def linear_schedule(total_steps: int, warmup_steps: int):
    """Linear warm-up to the peak lr over ``warmup_steps`` updates, then linear decay
    towards 0 at ``total_steps`` (paper: warm-up ratio 0.1, linear decay). The first
    update already has lr > 0, and so has the last. DeepSpeed's WarmupDecayLR forces at
    least 2 warm-up steps, which would make ``--warmup-ratio 0`` a lie."""

    def factor(update: int) -> float:  # update = 0 for the first optimizer step
        if update < warmup_steps:
            return (update + 1) / warmup_steps
        return max(total_steps - update, 0) / max(total_steps - warmup_steps, 1)

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_partitioned(path: str, ds: dict, config, dtype: torch.dtype):
    # Must be alive while from_pretrained runs: transformers then builds the model under
    # deepspeed.zero.Init and loads each rank's partition only.
    hf_ds_config = HfDeepSpeedConfig(ds)  # noqa: F841
    attention.register()
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attention.resolve(config.attn_implementation, packing=config.packing),
        trust_remote_code=config.trust_remote_code,
    )


def _answer_logps(model, config, ds: dict) -> AnswerLogps:
    """``model`` behind the answer log-prob head. The hidden-state head uses the output
    projection's weight outside its module's forward: under ZeRO-3 DeepSpeed must be
    told (``register_external_parameter``) to gather it for the wrapper's forward and
    backward, or the wrapper would see an empty partition."""
    wrapper = AnswerLogps(model, head=config.logp_head)
    if wrapper.uses_hidden_states and ds["zero_optimization"]["stage"] == 3:
        deepspeed.zero.register_external_parameter(wrapper, wrapper.head_weight())
    return wrapper


def load_policy(config, ds: dict, dtype: torch.dtype, *, total_steps: int, warmup_steps: int):
    """The trainable policy as a DeepSpeed engine (optimizer and lr schedule inside);
    ``engine(input_ids=, attention_mask=, completion_mask=)`` gives ``[B]`` answer log-probs."""
    model = load_partitioned(config.model, ds, config, dtype)
    model.config.use_cache = False  # a KV cache is only for generation
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    wrapper = _answer_logps(model, config, ds)
    engine, *_ = deepspeed.initialize(
        model=wrapper, config=ds, model_parameters=[p for p in wrapper.parameters() if p.requires_grad],
        lr_scheduler=linear_schedule(total_steps, warmup_steps),
    )
    return engine


def load_reference(path: str, ds: dict, config, dtype: torch.dtype):
    """A frozen copy as a ZeRO inference engine (the ``--reference online`` baseline)."""
    model = load_partitioned(path, ds, config, dtype)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=_answer_logps(model, config, ds), config=ds)
    engine.eval()
    return engine


# ---- checkpoints --------------------------------------------------------------------------


def _rng_path(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rng-rank{rank:05d}.pt"


def save_checkpoint(engine, root: Path, step: int, keep: int, record: dict) -> None:
    """A collective: every rank writes its ZeRO partition, optimizer and RNG state under
    ``root/step-N``; after a barrier (every rank's files exist) rank 0 commits the tag
    (``train.checkpoints.commit``: its record, then ``latest`` replaced atomically) and
    removes the tags beyond ``keep``. A kill at any instant before the commit leaves
    the previous checkpoint in charge; ``record`` is stored with the tag.
    """
    tag = checkpoints.tag_name(step)
    # DeepSpeed's own `latest` would be written by rank 0 as soon as *its* files are
    # written, while other ranks may still be writing theirs.
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if ON_GPU else None}
    torch.save(rng, _rng_path(root / tag, dist.get_rank()))
    io_barrier()
    if dist.get_rank() == 0:
        checkpoints.commit(root, tag, {**record, "step": step, "world_size": dist.get_world_size(),
                                       "zero_stage": engine.zero_optimization_stage()})
        checkpoints.rotate(root, keep)
    io_barrier()


def prepare_resume(root: Path, resume: dict | None, ds: dict) -> None:
    """Before the engine exists: when the committed checkpoint was written by another
    number of ranks, convert it once (rank 0) to DeepSpeed's universal format, whose
    per-parameter fp32 weights and Adam moments any world size re-partitions, and have
    the engine load that (``checkpoint.load_universal``). A collective."""
    if resume is None or resume["world_size"] == dist.get_world_size():
        return
    target = root / checkpoints.universal_name(resume["tag"])
    if dist.get_rank() == 0 and not target.exists():
        print(f"minorsft: {resume['tag']} was written by {resume['world_size']} ranks, this job has "
              f"{dist.get_world_size()}: converting it to DeepSpeed's universal checkpoint format", file=sys.stderr,
              flush=True)
        _convert_to_universal(root / resume["tag"], target)
    io_barrier()
    ds.setdefault("checkpoint", {})["load_universal"] = True


def _convert_to_universal(source: Path, target: Path) -> None:
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    partial = target.with_name(f".{target.name}.tmp")  # a kill mid-way leaves only this, removed later
    shutil.rmtree(partial, ignore_errors=True)
    # One worker each: no process pools inside a rank of a distributed job.
    ds_to_universal.main(Namespace(input_folder=str(source), output_folder=str(partial), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   # ZeRO-1/2 checkpoints must carry a version record that only
                                   # Megatron-style clients write; for a plain model it is just that.
                                   inject_missing_state=True))
    (target.parent / "latest_universal").unlink(missing_ok=True)  # we load by tag; `latest` stays ours
    os.replace(partial, target)


def load_checkpoint(engine, root: Path, resume: dict | None) -> int:
    """Restore the committed checkpoint ``resume`` (see ``train.checkpoints.committed``);
    return its step (0: none, fresh start). On another world size rank r takes the RNG
    state of the saved rank r mod W (it only drives dropout)."""
    if resume is None:
        return 0
    tag = resume["tag"]
    universal = engine.load_universal_checkpoint()
    path, client_state = engine.load_checkpoint(
        str(root), tag=checkpoints.universal_name(tag) if universal else tag)
    if path is None:
        raise RuntimeError(f"{root}: could not load the committed checkpoint {tag}")
    if universal:
        io_barrier()
        if dist.get_rank() == 0:  # loaded; the next commit supersedes it (a kill before that converts again)
            shutil.rmtree(root / checkpoints.universal_name(tag))
    rng = torch.load(_rng_path(root / tag, dist.get_rank() % resume["world_size"]), weights_only=False)
    torch.set_rng_state(rng["torch"])
    if ON_GPU and rng["cuda"] is not None and resume["world_size"] == dist.get_world_size():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(client_state["step"])


def save_final(engine, tokenizer, output: Path) -> None:
    """Write a Hugging Face directory (config, safetensors, tokenizer, generation config),
    gathering ZeRO-3 partitions onto rank 0 (a collective: every rank calls it)."""
    state_dict = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_partition_weights() \
        else engine.module.state_dict()
    if dist.get_rank() == 0:
        output.mkdir(parents=True, exist_ok=True)
        model = engine.module.model  # inside the AnswerLogps wrapper, whose keys start with "model."
        state_dict = {key.removeprefix("model."): value for key, value in state_dict.items()}
        model.config.use_cache = True  # restore the generation default turned off for training
        model.save_pretrained(output, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(output)
    io_barrier()
