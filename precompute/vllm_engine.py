"""The vLLM scoring engine: prompt log-probs of the actual tokens, nothing generated.

Each sample goes in as a ``TokensPrompt`` (the ids exactly as rendered; vLLM's
tokenizer never re-tokenizes them), with ``max_tokens=1, prompt_logprobs=0``: vLLM returns, per
prompt position p >= 1, only the log-prob of ``input_ids[p]`` given ``input_ids[:p]``
(checked against vllm 0.32: ``FlatLogprobs`` holds one entry per position, none for
position 0). The one generated token is thrown away.

Only this module imports vllm, and only when the engine is built. ``LLM(...)`` spawns
worker processes, so it must be built under ``if __name__ == "__main__":`` or from the
``minorsft`` command.
"""

from __future__ import annotations

import os

import numpy as np

from minorsft_core.config import PrecomputeConfig
from minorsft_core.data import Sample
from minorsft_core.model_dir import context_length
from precompute.engines import Progress, Scores, engine_version


def max_model_len(model_dir: str, max_seq_len: int) -> int:
    """vLLM refuses a prompt that leaves no room for one output token, so it needs
    ``max_seq_len + 1`` positions. When that is one past the model's context, the extra
    position only serves the discarded token: vLLM is told to allow it."""
    limit = context_length(model_dir)
    if limit is not None and max_seq_len + 1 > limit:
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    return max_seq_len + 1


MAX_NUM_SEQS = 256  # vLLM's CPU default


class VllmEngine:
    name = "vllm"

    def __init__(self, config: PrecomputeConfig, *, dtype: str, gpu_memory_utilization: float):
        if config.quiet:
            # Batch logs: vLLM's start-up INFO lines outnumber ours; warnings still show.
            # Read at import, and inherited by vLLM's worker processes.
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM, SamplingParams

        self.version = engine_version("vllm")
        self._llm = LLM(
            model=config.model,
            dtype=dtype,
            max_model_len=max_model_len(config.model, config.max_seq_len),
            # Bounds the prompt log-probs' memory (precompute.engines.batch_tokens);
            # vLLM needs at least as many tokens per step as sequences.
            max_num_batched_tokens=config.max_batch_tokens,
            max_num_seqs=min(MAX_NUM_SEQS, config.max_batch_tokens),
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            # Prompt log-probs bypass the prefix cache anyway; off, so no cached block
            # can ever stand in for a computed one.
            enable_prefix_caching=False,
            enforce_eager=config.enforce_eager,
            trust_remote_code=config.trust_remote_code,
            load_format="safetensors",
            seed=config.seed,
        )
        self._params = SamplingParams(
            max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True
        )

    def score(self, samples: list[Sample], progress: Progress) -> Scores:
        from vllm.inputs import TokensPrompt

        # One call per chunk: vLLM batches within it; results are written and freed
        # chunk by chunk, never held for the whole dataset.
        outputs = self._llm.generate(
            [TokensPrompt(prompt_token_ids=s.input_ids) for s in samples], self._params, use_tqdm=False
        )
        sums = np.empty(len(samples), dtype=np.float64)
        token_logps = []
        for k, (sample, output) in enumerate(zip(samples, outputs, strict=True)):
            answer = answer_token_logps(sample, output.prompt_logprobs)
            token_logps.append(answer)
            sums[k] = answer.sum(dtype=np.float64)
        progress(len(samples), sum(len(s.input_ids) for s in samples))
        return Scores(sums, token_logps)

    def close(self) -> None:
        self._llm.llm_engine.engine_core.shutdown()


def answer_token_logps(sample: Sample, prompt_logprobs) -> np.ndarray:
    """The answer positions' log-probs from vLLM's ``FlatLogprobs`` of one prompt.

    Entry p - 1 of the flat arrays is position p's. The returned token ids are checked
    against the prompt, so a change in vLLM's output layout fails loudly instead of
    writing log-probs of the wrong tokens.
    """
    ids = np.asarray(sample.input_ids)
    got_ids = np.asarray(prompt_logprobs.token_ids)
    if got_ids.shape != (len(ids) - 1,) or not np.array_equal(got_ids, ids[1:]):
        raise RuntimeError(
            f"vLLM returned prompt log-probs for other tokens than sample {sample.sample_id!r} "
            f"({got_ids.size} entries for {len(ids)} prompt tokens); this vLLM version's output "
            "layout is not supported, use --engine hf"
        )
    logps = np.asarray(prompt_logprobs.logprobs, dtype=np.float32)
    return logps[np.asarray(sample.completion_mask[1:], dtype=bool)]
