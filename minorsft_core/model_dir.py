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


def context_length(model_dir: str | os.PathLike) -> int | None:
    """The longest sequence the model's config allows (``max_position_embeddings``, also
    under ``text_config`` as multimodal configs nest it), or None if it does not say."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.exists():
        raise InputError(f"{model_dir}: no config.json; --model must be a Hugging Face model directory")
    config = json.loads(config_path.read_text())
    for section in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(section.get(key), int):
                return section[key]
    return None


def load_tokenizer(model: str, *, trust_remote_code: bool):
    """The model's tokenizer. A tokenizer that does not load (files missing, corrupt or of
    an unknown kind) is an unusable input, whatever transformers raises for it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as err:  # OSError, ValueError, JSON and tokenizers' own errors alike
        raise InputError(f"--model {model}: cannot load its tokenizer ({type(err).__name__}: {err}); "
                         "the directory needs the tokenizer files saved with the model") from err
