"""A Hugging Face model directory as both stages read it: its context length and its
tokenizer, with failures reported as bad input (exit 3) naming the directory.

transformers is imported inside ``load_tokenizer`` only, so importing this stays cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from minorsft_core.errors import InputError

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions")


def _config_value(model_dir: str | os.PathLike, keys: tuple[str, ...]) -> int | None:
    """The first integer of ``keys`` in the model's config.json, also looked up under
    ``text_config`` (where multimodal configs nest the language model's)."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.exists():
        raise InputError(f"{model_dir}: no config.json; --model must be a Hugging Face model directory")
    config = json.loads(config_path.read_text())
    for section in (config, config.get("text_config") or {}):
        for key in keys:
            if isinstance(section.get(key), int):
                return section[key]
    return None


def context_length(model_dir: str | os.PathLike) -> int | None:
    """The longest sequence the model allows, or None if its config does not say."""
    return _config_value(model_dir, _CONTEXT_KEYS)


def vocab_size(model_dir: str | os.PathLike) -> int | None:
    return _config_value(model_dir, ("vocab_size",))


def load_tokenizer(model: str, *, trust_remote_code: bool):
    """The model's tokenizer. A tokenizer that does not load (files missing, corrupt or of
    an unknown kind) is an unusable input, whatever transformers raises for it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as err:  # OSError, ValueError, JSON and tokenizers' own errors alike
        raise InputError(f"--model {model}: cannot load its tokenizer ({type(err).__name__}: {err}); "
                         "the directory needs the tokenizer files saved with the model") from err
