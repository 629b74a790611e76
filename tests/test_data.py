"""Data: masks token by token, EOS trained, one BOS, pad distinct from EOS, and clear errors on bad rows."""

from __future__ import annotations

import copy
import json

import pytest
from tokenizers import processors

from qlora_kit import data
from qlora_kit.errors import UserError
from qlora_kit.model import ensure_pad_token, read_template
from qlora_kit.recipe import DataSource

from .conftest import chat, write_jsonl


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != data.IGNORE_INDEX])


def encode(tokenizer, row: dict, fmt: str):
    return data.tokenize(tokenizer, *data.render(data.Row(row, "test row 1", fmt), fmt, tokenizer))


def test_multi_turn_masks_exactly_the_assistant_turns(demo_tokenizer):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 plus 4?"},
        {"role": "assistant", "content": "8"},
    ]}
    ids, labels = encode(demo_tokenizer, row, "messages")
    pieces = [(demo_tokenizer.decode([t]), label != data.IGNORE_INDEX) for t, label in zip(ids, labels, strict=True)]
    trained_runs, current = [], ""
    for piece, trained in pieces:
        if trained:
            current += piece
        elif current:
            trained_runs.append(current)
            current = ""
    if current:
        trained_runs.append(current)
    assert trained_runs == ["5<|im_end|>\n", "8<|im_end|>\n"]
    assert len(ids) == len(labels)


def test_end_of_turn_is_trained_and_no_extra_eos_for_chat(demo_tokenizer):
    ids, labels = encode(demo_tokenizer, chat("hi", "hello"), "messages")
    end = demo_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in [label for label in labels if label != data.IGNORE_INDEX]
    assert ids.count(demo_tokenizer.eos_token_id) == 0 or demo_tokenizer.eos_token_id == end


def test_prompt_completion_and_text_end_with_trained_eos(demo_tokenizer):
    ids, labels = encode(demo_tokenizer, {"prompt": "2 plus 2 is", "completion": " 4."}, "prompt_completion")
    assert ids[-1] == labels[-1] == demo_tokenizer.eos_token_id
    assert trained_text(demo_tokenizer, ids, labels).replace("<|endoftext|>", "") == " 4."
    ids, labels = encode(demo_tokenizer, {"text": "the cat sat."}, "text")
    assert labels[-1] == demo_tokenizer.eos_token_id and all(label != data.IGNORE_INDEX for label in labels)


def test_conversational_prompt_completion(demo_tokenizer):
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    ids, labels = encode(demo_tokenizer, row, "prompt_completion")
    assert trained_text(demo_tokenizer, ids, labels) == "yo<|im_end|>\n"


@pytest.fixture
def bos_tokenizer(demo_tokenizer):
    """The demo tokenizer changed to add BOS itself, like Llama's."""
    tokenizer = copy.deepcopy(demo_tokenizer)
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    assert data.adds_bos(tokenizer)
    return tokenizer


@pytest.mark.parametrize("template_has_bos", [False, True])
def test_exactly_one_bos(bos_tokenizer, template_has_bos):
    template = read_template("chatml")
    bos_tokenizer.chat_template = ("{{ bos_token }}" + template) if template_has_bos else template
    ids, labels = encode(bos_tokenizer, chat("hi", "yo"), "messages")
    assert ids[0] == bos_tokenizer.bos_token_id and ids[1] != bos_tokenizer.bos_token_id
    assert ids.count(bos_tokenizer.bos_token_id) == 1
    assert labels[0] == data.IGNORE_INDEX


def test_pad_token_is_never_eos(demo_tokenizer):
    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    note = ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id, note


def test_local_file_kinds(tmp_path):
    rows = [{"text": "a b"}, {"text": "c d"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    (tmp_path / "x.json").write_text(json.dumps(rows))
    (tmp_path / "x.csv").write_text("text\na b\nc d\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        read = data.read_source(DataSource(path=str(tmp_path / f"x.{suffix}")))
        assert [r.data["text"] for r in read] == ["a b", "c d"], suffix
        assert data.detect_format(read, "auto", "x") == "text"


@pytest.mark.parametrize("content, fmt, match", [
    ('{"messages": []}\n{"text": ', "auto", r"x.jsonl line 2: not valid JSON"),
    ('{"prompt": "a"}\n', "prompt_completion", r"x.jsonl line 1: missing column 'completion'"),
    ('{"messages": [{"role": "robot", "content": "a"}]}\n', "messages", r"line 1: messages\[0\] has unknown role 'robot'"),
    ('{"messages": []}\n', "messages", r"line 1: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', "messages", r"line 1: the conversation has no assistant"),
    ("\n", "auto", r"has no rows"),
    ('{"foo": 1}\n', "auto", r"cannot tell the format from columns \['foo'\]"),
])
def test_bad_rows_name_file_and_line(tmp_path, demo_tokenizer, content, fmt, match):
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        rows = data.read_source(DataSource(path=str(path)))
        fmt = data.detect_format(rows, fmt, "data.train.0")
        for row in rows:
            data.render(row, fmt, demo_tokenizer)


def test_missing_file_and_bad_csv(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.read_source(DataSource(path=str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(UserError, match="not a valid Parquet file"):
        data.read_source(DataSource(path=str(bad)))


def test_length_policy_is_reported(demo_tokenizer, tmp_path):
    rows = [data.Row(chat("hi", "long answer " * 20), f"r{i}", "messages") for i in range(3)]
    stats = data.DataStats()
    out = data.encode_rows(rows, demo_tokenizer, 32, "truncate", stats)
    assert stats.truncated == 3 and [len(ids) for ids in out["input_ids"]] == [32, 32, 32]
    prompt_only = [data.Row(chat("word " * 40, "yes"), "r", "messages")]
    stats = data.DataStats()
    assert data.encode_rows(prompt_only, demo_tokenizer, 32, "truncate", stats)["input_ids"] == []
    assert stats.dropped_no_target == 1
    stats = data.DataStats()
    out = data.encode_rows(rows, demo_tokenizer, 32, "drop", stats)
    assert stats.dropped_too_long == 3 and out["input_ids"] == []
