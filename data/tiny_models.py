"""Tiny Qwen2-shaped models and ChatML tokenizers built locally (no model hub), and the
word list their tokenizers are trained on: a recipe of the tests' fixtures, the
benchmarks and the bundled default (``make_default.py``), not part of the package.

Import it with this folder on ``sys.path`` (pytest's ``pythonpath`` has it; scripts
here and in ``benchmarks/`` insert it).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

WORDS = (
    "the a model answer question data train loss token reference policy learn small large "
    "quick brown fox jumps over lazy dog cat river mountain blue green red number one two three "
    "four five why how what when where because therefore however and or not is are was were"
).split()


def make_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Sentences of 4 to 30 of ``WORDS``: a corpus to train a tiny tokenizer on."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) + "." for _ in range(n)]

# Qwen2-Instruct's chat template (ChatML, with its default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts``, with Qwen2's special tokens and
    ChatML template, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(tokenizer, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 2, num_kv_heads: int = 1, intermediate_size: int = 128,
                max_position_embeddings: int = 2048, embedding_rows: int | None = None):
    """A randomly initialised Qwen2ForCausalLM over ``tokenizer``'s vocabulary (fp32).

    ``embedding_rows``: rows of the embedding and output head when more than the
    tokenizer's (a real vocabulary's size: its memory and head cost, while the text
    uses only the tokenizer's first few hundred ids). The tokenizer itself stays small:
    a BPE trained on a few thousand words learns a few hundred tokens, whatever size
    it is asked for.

    Head size is ``hidden_size / num_heads``: vLLM's CPU attention supports head sizes
    of 32 and up only, so the defaults give 32 (16 fails at engine start).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=max(len(tokenizer), embedding_rows or 0),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(torch.float32)


def save_tiny_model(output_dir: str | os.PathLike, texts: Iterable[str], *, seed: int = 0,
                    vocab_size: int = 512, **model_kwargs) -> Path:
    """Build and save a tokenizer + tiny model as one Hugging Face directory."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    model = build_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(output_dir)  # safetensors
    tokenizer.save_pretrained(output_dir)
    return output_dir
