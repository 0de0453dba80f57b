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


# ---- other tokenizers and templates ---------------------------------------------------------

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def llama3_style_tokenizer():
    """A BPE tokenizer with Llama-3's special tokens and chat template, which, like
    Llama's, Mistral's and Gemma's, puts BOS in front of any text it encodes."""
    from conftest import make_texts
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "<|python_tag|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(make_texts(), trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
                                        extra_special_tokens=special[2:])
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def test_plain_text_gets_the_bos_its_tokenizer_adds(llama3_style_tokenizer, tiny_tokenizer):
    """--template none encodes text as the tokenizer does: BOS first where it adds one
    (before: never, and base models score text without BOS tens of nats lower), nothing
    for Qwen2's tokenizer."""
    record = {"prompt": "why", "completion": "because"}
    tokenizer = llama3_style_tokenizer
    assert tokenizer("why", add_special_tokens=True)["input_ids"][0] == tokenizer.bos_token_id
    sample = _renderer(tokenizer, "prompt_completion", template="none").render(0, record)
    assert sample.input_ids[0] == tokenizer.bos_token_id and sample.completion_mask[0] == 0
    assert tokenizer.decode(sample.input_ids) == "<|begin_of_text|>why\nbecause<|eot_id|>"
    assert _answer_texts(tokenizer, sample) == ["because<|eot_id|>"]
    plain = _renderer(tiny_tokenizer, "prompt_completion", template="none").render(0, record)
    assert plain.input_ids == tiny_tokenizer("why\nbecause<|im_end|>", add_special_tokens=False)["input_ids"]


def test_llama3_style_chat_template(llama3_style_tokenizer):
    tokenizer = llama3_style_tokenizer
    record = {"messages": [{"role": "user", "content": "why?"}, {"role": "assistant", "content": "because."},
                           {"role": "user", "content": "how?"}, {"role": "assistant", "content": " so. "}]}
    sample = _renderer(tokenizer).render(0, record)
    assert _answer_texts(tokenizer, sample) == ["because.<|eot_id|>", "so.<|eot_id|>"]
    assert tokenizer.decode(sample.input_ids) == tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert sample.input_ids.count(tokenizer.bos_token_id) == 1  # the template's, not a second one


def test_a_token_the_generation_prompt_omits_stays_with_the_answer(llama3_style_tokenizer):
    """A template that starts assistant turns with a special token the generation prompt
    does not emit: the answer is that token, the content and the end of turn (before:
    the token alone, the content dropped). A template that does not render the content
    as given is a bad_template reject, never a wrong answer."""
    tokenizer = llama3_style_tokenizer
    record = {"messages": [{"role": "user", "content": "why?"}, {"role": "assistant", "content": "because."}]}
    tokenizer.chat_template = LLAMA3_TEMPLATE.replace(
        "\n\n{{ message['content'] | trim }}",
        "\n\n{% if message['role'] == 'assistant' %}<|python_tag|>{% endif %}{{ message['content'] | trim }}")
    try:
        sample = _renderer(tokenizer).render(0, record)
        assert _answer_texts(tokenizer, sample) == ["<|python_tag|>because.<|eot_id|>"]
        tokenizer.chat_template = LLAMA3_TEMPLATE.replace("{{ message['content'] | trim }}",
                                                          "{{ message['content'] | upper }}")
        reject = _renderer(tokenizer).render(3, {**record, "id": "x"})
        assert isinstance(reject, Reject) and reject.reason == data.BAD_TEMPLATE and reject.id == "x"
        assert "messages[1]" in reject.detail
    finally:
        tokenizer.chat_template = LLAMA3_TEMPLATE
