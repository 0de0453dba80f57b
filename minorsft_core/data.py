"""From input records to samples ready to score (input formats: ``docs/precompute.md``).

``read_records`` streams ``(row, record)`` pairs from a JSONL / JSON / Parquet file or
a ``datasets`` directory, turning lines that do not parse into rejects instead of
errors. ``SampleRenderer`` turns one record into a ``Sample`` (token ids plus answer
mask) or a ``Reject`` with a reason. Structural problems (no such file, unknown
format, nothing valid at all) raise ``DataError`` naming the file and the fix.

Rendering: the record becomes a conversation; the tokenizer's chat template renders
it; the text is cut into prompt and answer segments at each assistant turn; each
segment is tokenized on its own and the ids are concatenated, so an answer boundary
never depends on a BPE merge across it. An answer segment is what the template renders
for the assistant message beyond the generation prompt (tokens the generation prompt
does not emit included: the model must produce them), through the first special token
after the content (the end of turn). A row whose content the template does not render
as given is rejected (``bad_template``), never trained on with a wrong answer.

Plain text (``--template none``, base models) is encoded as the tokenizer encodes text:
with the special tokens it adds in front (Llama, Mistral and Gemma tokenizers add BOS;
Qwen2's adds nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from minorsft_core.errors import DataError

FORMATS = ("prompt_completion", "alpaca", "messages")
TEMPLATES = ("chat", "none")
ROLES = ("system", "user", "assistant", "tool")


# Reject reasons. Every input row ends up scored or rejected with one of these.
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
EMPTY_ANSWER = "empty_answer"
TOO_LONG = "too_long"
BAD_ROLE = "bad_role"
BAD_TEMPLATE = "bad_template"
REJECT_REASONS = (INVALID_JSON, MISSING_FIELD, BAD_TYPE, EMPTY_ANSWER, TOO_LONG, BAD_ROLE, BAD_TEMPLATE)


@dataclasses.dataclass(frozen=True)
class Reject:
    row: int
    reason: str
    detail: str
    id: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Sample:
    row: int
    sample_id: str
    input_ids: list[int]
    completion_mask: list[int]

    @property
    def answer_len(self) -> int:
        return sum(self.completion_mask)


class _BadRecord(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---- reading ------------------------------------------------------------------------------


def input_files(path: str | os.PathLike) -> list[Path]:
    """The files that make up an input (for fingerprinting)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; pass --data a JSONL/JSON/Parquet file or a datasets directory")
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    row = 0
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield row, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield row, Reject(row, INVALID_JSON, f"line {line_number}: {err}")
            row += 1


def _input_kind(path: Path) -> str:
    """How an input is read: ``datasets``, ``jsonl``, ``json_array`` or ``parquet``."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        return "datasets"
    if path.suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if path.suffix == ".json":
        with open(path, "rb") as handle:
            head = handle.read(4096).lstrip()
        # Many datasets ship JSON Lines under a .json name.
        return "json_array" if head.startswith(b"[") else "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    raise DataError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .parquet or a datasets directory")


def _load_dataset(path: Path):
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{path}: reading a datasets directory needs `pip install datasets`") from err
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a directory saved with datasets' save_to_disk ({err}); pass a file instead") from err
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: a DatasetDict without a 'train' split; save the split to train on")
        dataset = dataset["train"]
    return dataset


def _load_json_array(path: Path) -> list:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); fix the file or convert it to JSONL") from err


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(row, record)`` for every input row, in a stable order.

    ``row`` counts records from 0 (for JSONL: non-blank lines). A JSONL line that
    does not parse is yielded as a ``Reject`` (reason ``invalid_json``) so that one
    bad line among millions never stops a run.
    """
    path = Path(path)
    kind = _input_kind(path)
    if kind == "datasets":
        yield from enumerate(_load_dataset(path))
    elif kind == "jsonl":
        yield from _iter_jsonl(path)
    elif kind == "json_array":
        yield from enumerate(_load_json_array(path))
    else:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield row, record
                row += 1


def count_records(path: str | os.PathLike) -> int:
    """How many rows ``read_records`` yields, without parsing them where the format allows
    (JSONL: non-blank lines; Parquet: its footer; datasets: its length)."""
    path = Path(path)
    kind = _input_kind(path)
    if kind == "datasets":
        return len(_load_dataset(path))
    if kind == "jsonl":
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    if kind == "json_array":
        return len(_load_json_array(path))
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def detect_input_format(path: str | os.PathLike, max_records: int = 100) -> str:
    """The record format of the first parseable records, or ``DataError``."""
    seen = 0
    for _, record in read_records(path):
        if isinstance(record, dict):
            found = detect_format(record)
            if found:
                return found
        seen += 1
        if seen >= max_records:
            break
    raise DataError(
        f"{path}: cannot tell the record format from the first {seen} rows. Records need "
        "'prompt'/'completion', 'instruction'/'output' (Alpaca) or 'messages'; or name it with --format"
    )


# ---- records to conversations -------------------------------------------------------------


def _text(record: dict, key: str, *, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise _BadRecord(MISSING_FIELD, f"no {key!r} field")
        return None
    if not isinstance(value, str):
        raise _BadRecord(BAD_TYPE, f"{key!r} is a {type(value).__name__}, not a string")
    return value


def to_messages(record: Any, fmt: str) -> list[dict[str, str]]:
    """The conversation a record stands for; every assistant message is an answer."""
    if not isinstance(record, dict):
        raise _BadRecord(BAD_TYPE, f"a record is a JSON object, got {type(record).__name__}")
    system = _text(record, "system", required=False)
    if fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text(record, "prompt")},
                    {"role": "assistant", "content": _text(record, "completion")}]
    elif fmt == "alpaca":
        instruction = _text(record, "instruction")
        extra = _text(record, "input", required=False)
        prompt = f"{instruction}\n{extra}" if extra else instruction  # as LLaMA-Factory joins them
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]
    elif fmt == "messages":
        raw = record.get("messages")
        if raw is None:
            raise _BadRecord(MISSING_FIELD, "no 'messages' field")
        if not isinstance(raw, list) or not raw:
            raise _BadRecord(BAD_TYPE, "'messages' must be a non-empty list of {role, content}")
        messages = []
        for k, message in enumerate(raw):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise _BadRecord(MISSING_FIELD, f"messages[{k}] needs 'role' and 'content'")
            if message["role"] not in ROLES:
                raise _BadRecord(BAD_ROLE, f"messages[{k}] has role {message['role']!r}; allowed: {', '.join(ROLES)}")
            if not isinstance(message["content"], str):
                raise _BadRecord(BAD_TYPE, f"messages[{k}].content is not a string")
            messages.append({"role": message["role"], "content": message["content"]})
        if any(m["role"] == "system" for m in messages[1:]):
            raise _BadRecord(BAD_ROLE, "a system message may only come first")
        if messages[0]["role"] == "system" and system is not None:
            raise _BadRecord(BAD_ROLE, "both a 'system' field and a system message")
    else:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise _BadRecord(EMPTY_ANSWER, "no assistant turn")
    if any(not m["content"].strip() for m in answers):
        raise _BadRecord(EMPTY_ANSWER, "an assistant turn is empty")
    return messages


# ---- conversations to token ids -----------------------------------------------------------


def _added_prefix_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of any text it encodes (BOS, for most base
    models), read off an encoding with and without its special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def hash_token_ids(input_ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(input_ids, dtype="<i4").tobytes()).hexdigest()[:24]


class SampleRenderer:
    """Turns records into ``Sample``s with one tokenizer, template mode and length cap."""

    def __init__(self, tokenizer, *, data_format: str, template: str = "chat",
                 max_seq_len: int = 4096, truncate_answer: bool = False):
        if data_format not in FORMATS:
            raise DataError(f"unknown format {data_format!r}; choose one of {', '.join(FORMATS)}")
        if template not in TEMPLATES:
            raise DataError(f"unknown template mode {template!r}; choose 'chat' or 'none'")
        if template == "chat" and not tokenizer.chat_template:
            raise DataError(
                "the tokenizer has no chat template; pass --template none for a base model, "
                "or use the instruct model's tokenizer"
            )
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token; answers could not end")
        self.tokenizer = tokenizer
        self.data_format = data_format
        self.template = template
        self.max_seq_len = max_seq_len
        self.truncate_answer = truncate_answer
        self._special_ids = set(tokenizer.all_special_ids) | {
            token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
        }
        self._text_prefix_ids = _added_prefix_ids(tokenizer) if template == "none" else []

    def render(self, row: int, record: Any) -> Sample | Reject:
        if isinstance(record, Reject):
            return record
        record_id = record.get("id") if isinstance(record, dict) else None
        record_id = None if record_id is None else str(record_id)
        try:
            messages = to_messages(record, self.data_format)
            segments = self._segments(messages)
            input_ids, completion_mask = self._tokenize(segments)
            input_ids, completion_mask = self._fit_length(input_ids, completion_mask)
        except _BadRecord as bad:
            return Reject(row, bad.reason, bad.detail, record_id)
        sample_id = record_id if record_id is not None else hash_token_ids(input_ids)
        return Sample(row, sample_id, input_ids, completion_mask)

    def _segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """``[(text, is_answer), ...]``: the rendered conversation cut at assistant turns."""
        if self.template == "none":
            segments = []
            for message in messages:
                if message["role"] == "assistant":
                    segments.append((message["content"] + self.tokenizer.eos_token, True))
                else:
                    segments.append((message["content"] + "\n", False))
            return segments
        segments: list[tuple[str, bool]] = []
        rendered = ""
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._apply_template(messages[:k], add_generation_prompt=True)
            through = self._apply_template(messages[: k + 1], add_generation_prompt=False)
            if not before.startswith(rendered) or not through.startswith(before):
                raise DataError(
                    "the chat template does not render conversations prefix-consistently (turn "
                    f"{k} changes earlier text), so answer boundaries are ambiguous; use --template none "
                    "or a template that appends turns"
                )
            segments.append((before[len(rendered):], False))
            answer, rest = self._split_end_of_turn(through[len(before):], message["content"], k)
            segments.append((answer, True))
            rendered = before + answer
        # Text after the last answer carries no loss: it is left out.
        return [(text, is_answer) for text, is_answer in segments if text]

    def _apply_template(self, messages, *, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _split_end_of_turn(self, turn: str, content: str, k: int) -> tuple[str, str]:
        """Cut an assistant turn's rendering after the end-of-turn token that follows its content.

        ``turn`` is what the template renders for the message beyond the generation
        prompt: perhaps tokens the generation prompt does not emit, the content, and what
        the template appends, e.g. ``"Hi<|im_end|>\\n"``. The answer runs through the first
        special token after the content; the rest (the newline) belongs to the next
        prompt. A template that appends no special token gets the eos token appended, so
        the model learns to stop. Content the template does not render as given (beyond
        trimming whitespace) is a ``bad_template`` reject: its answer would be other text.
        """
        start = turn.find(content.strip())
        if start < 0:
            raise _BadRecord(BAD_TEMPLATE, f"messages[{k}]: the chat template does not render this assistant "
                                           "content as given, so its answer tokens cannot be found")
        content_end = start + len(content.strip())
        tail = turn[content_end:]
        for token_id in self.tokenizer(tail, add_special_tokens=False)["input_ids"]:
            if token_id in self._special_ids:
                # Special tokens are split out before BPE, so the first special id is the
                # first occurrence of its text.
                text = self.tokenizer.convert_ids_to_tokens(token_id)
                cut = content_end + tail.index(text) + len(text)
                return turn[:cut], turn[cut:]
        return turn + self.tokenizer.eos_token, ""

    def _tokenize(self, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        input_ids: list[int] = list(self._text_prefix_ids)
        completion_mask: list[int] = [0] * len(input_ids)
        for text, is_answer in segments:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids.extend(ids)
            completion_mask.extend([int(is_answer)] * len(ids))
        if not input_ids:
            raise _BadRecord(EMPTY_ANSWER, "renders to no tokens")
        if completion_mask[0]:
            # An answer at position 0 has no predicting logit; prepend BOS (or eos) as context.
            bos = self.tokenizer.bos_token_id
            input_ids.insert(0, bos if bos is not None else self.tokenizer.eos_token_id)
            completion_mask.insert(0, 0)
        if sum(completion_mask) == 0:
            raise _BadRecord(EMPTY_ANSWER, "the answer renders to no tokens")
        return input_ids, completion_mask

    def _fit_length(self, input_ids: list[int], completion_mask: list[int]) -> tuple[list[int], list[int]]:
        if len(input_ids) <= self.max_seq_len:
            return input_ids, completion_mask
        if self.truncate_answer:
            input_ids, completion_mask = input_ids[: self.max_seq_len], completion_mask[: self.max_seq_len]
            if sum(completion_mask):
                return input_ids, completion_mask
        raise _BadRecord(
            TOO_LONG,
            f"{len(input_ids)} tokens > --max-seq-len {self.max_seq_len}"
            + ("" if self.truncate_answer else " (raise it, or pass --truncate-answer)"),
        )
