"""``varlen``: padding-free attention for packed rows, without the flash-attn package.

A packed row (``batching.pack``) holds several samples end to end; each must attend to
itself only. transformers' sdpa path does that with a dense block-diagonal mask over
the whole row, so attention costs ``(sum_i n_i)^2`` instead of ``sum_i n_i^2`` and the
mask itself is ``N^2`` memory. flash-attn's varlen kernel does it properly but must be
built against the installed torch and CUDA, which many pools cannot do.

``varlen`` is registered with transformers' attention interfaces (``register``) and
attends per sample from the samples' boundaries (``cu_seq_lens_q``, given once per
forward by ``logp_head.varlen_kwargs``, else derived from the restarting position ids):

- on CUDA through PyTorch's own FlashAttention varlen kernel
  (``torch.nn.attention.varlen.varlen_attn``), causal, GQA included;
- elsewhere (CPU) through one causal ``scaled_dot_product_attention`` per sample.

A padded ``[B, T]`` batch (an attention mask, no boundaries) takes transformers' sdpa
path unchanged, so one model loaded with ``varlen`` scores both layouts.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F

VARLEN = "varlen"


def register() -> None:
    """Make ``attn_implementation="varlen"`` loadable (idempotent; call before
    ``from_pretrained``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


def resolve(attn_implementation: str, *, packing: bool) -> str:
    """What ``--attn-implementation auto`` means: ``varlen`` for packed rows (per-sample
    attention), transformers' ``sdpa`` for padded batches. Other names pass through."""
    if attn_implementation != "auto":
        return attn_implementation
    return VARLEN if packing else "sdpa"


def _varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for a packed row (attention runs per sample); sdpa's for a padded batch."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def boundaries_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seq_lens [S+1] int32, longest)`` of a ``[1, N]`` row whose position ids restart
    at 0 at every sample (syncs with the device; ``varlen_kwargs`` spares this)."""
    row = position_ids.reshape(-1)
    starts = (row == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("varlen attention: a packed row's position ids must start at 0 for every sample")
    bounds = torch.cat([starts, starts.new_tensor([row.numel()])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query [B, Hq, T, D]``, ``key/value
    [B, Hkv, T, D]`` in; ``([B, T, Hq, D], None)`` out."""
    bounds, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    if bounds is None and attention_mask is None and position_ids is not None and query.shape[0] == 1:
        bounds, longest = boundaries_from_position_ids(position_ids)
    if bounds is None:  # a padded batch: transformers' own sdpa path
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention: a packed batch is one row, got {query.shape[0]}")
    if sliding_window is not None or not getattr(module, "is_causal", True):
        raise NotImplementedError("varlen attention supports full causal attention only (no sliding window)")
    if dropout and module.training:
        raise NotImplementedError("varlen attention has no attention dropout; set the model's attention_dropout to 0")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    # [1, H, N, D] -> [N, H, D]: the token-major layout varlen kernels take
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if q.is_cuda and _torch_varlen()[0] is not None:
        out = _cuda_varlen(q, k, v, bounds, int(longest), scaling)
    else:
        out = _per_sample_sdpa(q, k, v, bounds, scaling)
    return out[None], None  # [1, N, Hq, D]


def _per_sample_sdpa(q, k, v, bounds, scaling):
    """One causal sdpa per sample: exact, and ``sum_i n_i^2`` attention work."""
    gqa = q.shape[1] != k.shape[1]
    pieces = []
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        qs, ks, vs = (t[start:stop].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, n, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=gqa)
        pieces.append(o[0].transpose(0, 1))
    return torch.cat(pieces)


@functools.cache
def _torch_varlen() -> tuple:
    """``(varlen_attn, its parameter names)``, or ``(None, ())`` on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        warnings.warn("this torch has no torch.nn.attention.varlen: varlen attention runs one sdpa per sample "
                      "on CUDA too", stacklevel=3)
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _cuda_varlen(q, k, v, bounds, longest, scaling):
    """PyTorch's FlashAttention varlen kernel. Its signature changed across torch
    releases: causality is ``is_causal=True`` in the first ones and ``window_size=(-1,
    0)`` by 2.11; GQA is ``enable_gqa`` where it exists (2.13), else the key/value heads
    are repeated. Run on a GPU: torch 2.11 (``window_size``, heads repeated) only."""
    varlen_attn, params = _torch_varlen()
    options = {}
    if "window_size" in params:
        options["window_size"] = (-1, 0)
    else:
        options["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:  # query head h reads key/value head h // group, as transformers' repeat_kv
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if "scale" in params:
        options["scale"] = scaling
    else:  # the kernel scales by D^-0.5
        q = q * (scaling * q.shape[-1] ** 0.5)
    bounds = bounds.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, bounds, bounds, longest, longest, **options)
