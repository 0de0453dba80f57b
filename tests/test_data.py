"""Input records to samples (SPEC §4): formats, ChatML rendering, answer masks, rejects."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minorsft_core import data
from minorsft_core.data import Reject, Sample, SampleRenderer
from minorsft_core.errors import DataError

SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _renderer(tokenizer, fmt="messages", **kwargs):
    return SampleRenderer(tokenizer, data_format=fmt, **kwargs)


def _answer_texts(tokenizer, sample: Sample) -> list[str]:
    """Decoded runs of consecutive answer tokens."""
    runs, current = [], []
    for token_id, is_answer in zip(sample.input_ids, sample.completion_mask, strict=True):
        if is_answer:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_prompt_completion_matches_chat_template(tiny_tokenizer):
    """The ids equal the template's full rendering, tokenized segment by segment; the mask
    covers exactly the answer and its <|im_end|>."""
    sample = _renderer(tiny_tokenizer, "prompt_completion").render(0, {"prompt": "how are the fox", "completion": "the dog"})
    assert isinstance(sample, Sample)
    text = tiny_tokenizer.decode(sample.input_ids)
    assert text == SYSTEM_DEFAULT + "<|im_start|>user\nhow are the fox<|im_end|>\n<|im_start|>assistant\nthe dog<|im_end|>"
    assert _answer_texts(tiny_tokenizer, sample) == ["the dog<|im_end|>"]
    assert sample.input_ids[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sample.completion_mask[0] == 0
    assert sample.answer_len == sum(sample.completion_mask) >= 2


def test_segments_tokenized_separately(tiny_tokenizer):
    """The prompt's ids are exactly the prompt rendered alone: no BPE merge crosses the boundary."""
    renderer = _renderer(tiny_tokenizer, "prompt_completion")
    sample = renderer.render(0, {"prompt": "the", "completion": "the"})
    prompt_text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "the"}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    first_answer = sample.completion_mask.index(1)
    assert sample.input_ids[:first_answer] == prompt_ids
    assert sample.input_ids[first_answer:] == tiny_tokenizer("the<|im_end|>", add_special_tokens=False)["input_ids"]


def test_system_prompt(tiny_tokenizer):
    sample = _renderer(tiny_tokenizer, "prompt_completion").render(
        0, {"system": "be brief", "prompt": "why", "completion": "because"}
    )
    assert tiny_tokenizer.decode(sample.input_ids).startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user")


def test_multi_turn_every_assistant_turn_is_an_answer(tiny_tokenizer):
    record = {"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four five"},
    ]}
    sample = _renderer(tiny_tokenizer).render(0, record)
    assert _answer_texts(tiny_tokenizer, sample) == ["two<|im_end|>", "four five<|im_end|>"]
    full = tiny_tokenizer.apply_chat_template(record["messages"], tokenize=False)
    # Everything the template renders, except the newline after the last answer.
    assert tiny_tokenizer.decode(sample.input_ids) == full.removesuffix("\n")


def test_alpaca_joins_instruction_and_input(tiny_tokenizer):
    renderer = _renderer(tiny_tokenizer, "alpaca")
    sample = renderer.render(0, {"instruction": "add", "input": "one two", "output": "three"})
    assert "<|im_start|>user\nadd\none two<|im_end|>" in tiny_tokenizer.decode(sample.input_ids)
    no_input = renderer.render(1, {"instruction": "add", "input": "", "output": "three"})
    assert "<|im_start|>user\nadd<|im_end|>" in tiny_tokenizer.decode(no_input.input_ids)
    assert _answer_texts(tiny_tokenizer, sample) == ["three<|im_end|>"]


def test_template_none_for_base_models(tiny_tokenizer):
    sample = _renderer(tiny_tokenizer, "prompt_completion", template="none").render(
        0, {"prompt": "why", "completion": "because"}
    )
    assert tiny_tokenizer.decode(sample.input_ids) == "why\nbecause<|im_end|>"
    assert _answer_texts(tiny_tokenizer, sample) == ["because<|im_end|>"]


def test_sample_id_from_input_or_token_hash(tiny_tokenizer):
    renderer = _renderer(tiny_tokenizer, "prompt_completion")
    record = {"prompt": "why", "completion": "because"}
    assert renderer.render(0, {**record, "id": 17}).sample_id == "17"
    hashed = renderer.render(0, record).sample_id
    assert hashed == renderer.render(5, record).sample_id  # stable: depends on tokens only
    assert hashed != renderer.render(0, {"prompt": "why", "completion": "because not"}).sample_id


def test_too_long_and_truncation(tiny_tokenizer):
    record = {"prompt": "why", "completion": " ".join(["river mountain"] * 40)}
    full = _renderer(tiny_tokenizer, "prompt_completion").render(0, record)
    cap = len(full.input_ids) - 10
    reject = _renderer(tiny_tokenizer, "prompt_completion", max_seq_len=cap).render(3, {**record, "id": "x"})
    assert isinstance(reject, Reject) and reject.reason == "too_long" and reject.row == 3 and reject.id == "x"
    truncated = _renderer(tiny_tokenizer, "prompt_completion", max_seq_len=cap, truncate_answer=True).render(0, record)
    assert truncated.input_ids == full.input_ids[:cap] and truncated.answer_len == full.answer_len - 10
    prompt_len = full.completion_mask.index(1)
    still_too_long = _renderer(tiny_tokenizer, "prompt_completion", max_seq_len=prompt_len, truncate_answer=True)
    assert still_too_long.render(0, record).reason == "too_long"


BAD_ROWS = [
    ('{"prompt": "why", "completion": "because"', "invalid_json"),
    ('{"prompt": "why"}', "missing_field"),
    ('{"prompt": "why", "completion": "   "}', "empty_answer"),
    ('{"prompt": 3, "completion": "x"}', "bad_type"),
    ('["not", "an", "object"]', "bad_type"),
    ('{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}', "bad_role"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}, '
     '{"role": "assistant", "content": "z"}]}', "bad_role"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "empty_answer"),
    ('{"messages": [{"role": "user"}]}', "missing_field"),
    ('{"messages": []}', "bad_type"),
    ('{"prompt": "why", "completion": "' + "fox " * 400 + '"}', "too_long"),
]


def test_bad_rows_become_rejects_with_reasons(tiny_tokenizer, tmp_path):
    """A corpus of good and bad lines: each bad one is rejected with its reason and row,
    every good one is scored-ready, nothing is dropped, nothing raises."""
    path = tmp_path / "mixed.jsonl"
    good = '{"prompt": "why", "completion": "because"}'
    lines = []
    for line, _ in BAD_ROWS:
        lines += [good, line]
    path.write_text("\n".join(lines) + "\n\n")  # trailing blank lines are not rows
    renderer = SampleRenderer(tiny_tokenizer, data_format="prompt_completion", max_seq_len=256)
    # messages rows render with their own format: route by detected format per row
    results = []
    for row, record in data.read_records(path):
        fmt = (data.detect_format(record) if isinstance(record, dict) else None) or "prompt_completion"
        renderer.data_format = fmt
        results.append(renderer.render(row, record))
    assert len(results) == 2 * len(BAD_ROWS)
    assert all(isinstance(r, Sample) for r in results[0::2])
    rejects = results[1::2]
    assert [(r.row, r.reason) for r in rejects] == [(2 * k + 1, reason) for k, (_, reason) in enumerate(BAD_ROWS)]
    assert "line 2" in rejects[0].detail  # invalid_json names the file line
    assert all(json.loads(r.to_json())["reason"] for r in rejects)


def test_detect_format_and_structural_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "x", "output": "y"}\n')
    assert data.detect_input_format(path) == "alpaca"
    path.write_text("not json\n" + '{"messages": [{"role": "user", "content": "x"}]}\n')
    assert data.detect_input_format(path) == "messages"
    path.write_text('{"question": "x", "answer": "y"}\n')
    with pytest.raises(DataError, match="cannot tell the record format.*--format"):
        data.detect_input_format(path)
    with pytest.raises(DataError, match="no such file"):
        list(data.read_records(tmp_path / "missing.jsonl"))
    (tmp_path / "a.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        list(data.read_records(tmp_path / "a.csv"))


def test_renderer_refuses_tokenizer_without_template(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="--template none"):
        SampleRenderer(tokenizer, data_format="messages")
    with pytest.raises(DataError, match="unknown format"):
        SampleRenderer(tiny_tokenizer, data_format="sharegpt")


@pytest.mark.parametrize("kind", ["json", "parquet", "datasets"])
def test_other_input_kinds_read_the_same_records(tmp_path, kind):
    records = [{"prompt": f"p{k}", "completion": f"c{k}"} for k in range(5)]
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(records))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        import datasets

        path = tmp_path / "d"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    assert list(data.read_records(path)) == list(enumerate(records))
    assert data.count_records(path) == len(records)


def test_count_records_counts_jsonl_rows_as_read_records_numbers_them(tmp_path):
    """Blank lines are not rows; lines that do not parse are (they become rejects)."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n  \nnot json\n{"prompt": "c"}\n')
    assert data.count_records(path) == len(list(data.read_records(path))) == 3
    lines_under_json_name = tmp_path / "d.json"
    lines_under_json_name.write_text(path.read_text())
    assert data.count_records(lines_under_json_name) == 3
