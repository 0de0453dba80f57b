"""minorsft_core: the MinorSFT math, the stage-one/stage-two Parquet contract and
input-data rendering. Importing this package stays cheap: it never imports vllm,
deepspeed or torch.distributed (only ``losses`` imports torch, lazily on use)."""

__version__ = "0.1.0"
