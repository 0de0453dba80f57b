"""Answer log-probs of a causal LM without ``[B, T, V]`` logits: the one door both
stages score through (stage one's hf engine, the trainer's policy, the online reference).

``AnswerLogps`` wraps a transformers ``AutoModelForCausalLM``. When the model's logits
are exactly ``decoder(x) @ W.T (+ b)`` (a standard output head; see ``output_head``),
it runs the decoder, selects the answer positions of its final hidden states and hands
them to ``losses.token_logps_from_hidden``, which projects and log-softmaxes them chunk
by chunk. Anything else (logit soft-capping, logit scaling, a head that is not a
``Linear``) takes the full-logits path with a warning, so the numbers stay right.

Under ZeRO-3 the output projection's weight is partitioned and used here outside its
own module's forward: ``train/engine.py`` registers it as an external parameter of this
wrapper (DeepSpeed's documented way), so it is gathered for this forward and backward.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from minorsft_core import attention, losses

# Config fields that make logits something other than the head's plain projection
# (Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling, ...). A
# value of None or the neutral value means the projection is used as is.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0,
                     "output_multiplier_scale": 1.0}

HEADS = ("auto", "logits")


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output projection if its logits are exactly the projection of the
    decoder's final hidden states, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return None
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is model:
        return None
    config = getattr(model, "config", None)
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return None
    return head


def varlen_kwargs(sample_lengths: torch.Tensor, longest: int | None = None) -> dict:
    """Flash-attention's varlen arguments for a packed row of samples ``sample_lengths``
    long: cumulative boundaries ``[0, n_0, n_0 + n_1, ...]`` (int32) and the longest
    sample, as transformers' ``FlashAttentionKwargs`` take them. Given once per forward,
    they spare every layer re-deriving them from the position ids, which costs a few
    host-device syncs per layer (``modeling_flash_attention_utils._is_packed_sequence``,
    ``prepare_fa_kwargs_from_position_ids``). ``longest`` known on the host (``batching.pack``
    gives it) spares the last sync."""
    boundaries = nn.functional.pad(sample_lengths.cumsum(0, dtype=torch.int32), (1, 0))
    if longest is None:
        longest = int(sample_lengths.max())  # one sync per forward, not per layer
    return {"cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries, "max_length_q": longest,
            "max_length_k": longest}


def takes_varlen_kwargs(model: nn.Module) -> bool:
    """Whether the model's attention runs per sample from ``varlen_kwargs`` (flash-attn's
    kernels, or ``attention.VARLEN``)."""
    implementation = str(getattr(model.config, "_attn_implementation", ""))
    return "flash" in implementation or implementation == attention.VARLEN


class AnswerLogps(nn.Module):
    """``forward(input_ids, attention_mask, completion_mask[, position_ids, sample_lengths, answer_index, longest_sample])
    -> [B]`` summed fp32 answer log-probs of a padded grid or a packed row
    (``batching.ModelInputs.as_kwargs()``); ``token_logps`` gives them per token.

    ``head="auto"`` uses the hidden-state path when ``output_head`` finds a standard
    head (warning otherwise); ``head="logits"`` always builds full logits (the old path,
    kept for comparison and as an escape hatch).
    """

    def __init__(self, model: nn.Module, head: str = "auto"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head: {head!r} is not one of {', '.join(HEADS)}")
        self.model = model
        self.uses_hidden_states = head == "auto" and output_head(model) is not None
        if head == "auto" and not self.uses_hidden_states:
            warnings.warn(
                f"{type(model).__name__} has no standard output head (a Linear projection of the final hidden "
                "states, no logit scaling or soft-capping): answer log-probs go through full [B, T, V] logits, "
                "which costs memory at long answers and large vocabularies",
                stacklevel=2,
            )

    def head_weight(self) -> nn.Parameter | None:
        """The output projection's weight the hidden-state path uses (None on the logits path)."""
        return self.model.get_output_embeddings().weight if self.uses_hidden_states else None

    def token_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    completion_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                    sample_lengths: torch.Tensor | None = None, answer_index: torch.Tensor | None = None,
                    longest_sample: int | None = None) -> torch.Tensor:
        """``[B, T]`` per-token answer log-probs (``[1, N]`` for a packed row: pass
        ``position_ids`` restarting at every sample, ``sample_lengths`` and no
        ``attention_mask``; see ``batching.pack``). ``answer_index`` and
        ``longest_sample``, made on the host (``batching``), spare device syncs."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if sample_lengths is not None and takes_varlen_kwargs(self.model):
            inputs.update(varlen_kwargs(sample_lengths, longest_sample))
        if not self.uses_hidden_states:
            return losses.token_logps(self.model(**inputs).logits, input_ids, completion_mask,
                                      answer_index=answer_index)
        decoded = self.model.get_decoder()(**inputs)
        head = self.model.get_output_embeddings()
        return losses.token_logps_from_hidden(
            decoded.last_hidden_state, head.weight, input_ids, completion_mask, lm_head_bias=head.bias,
            answer_index=answer_index)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, completion_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, sample_lengths: torch.Tensor | None = None,
                answer_index: torch.Tensor | None = None, longest_sample: int | None = None) -> torch.Tensor:
        """``[B]`` summed answer log-probs; for a packed row, one per entry of ``sample_lengths``."""
        per_token = self.token_logps(input_ids, attention_mask, completion_mask, position_ids, sample_lengths,
                                     answer_index, longest_sample)
        if sample_lengths is None:
            return per_token.sum(-1)
        return losses.packed_sums(per_token[0], sample_lengths)
