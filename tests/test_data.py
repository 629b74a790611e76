"""Data: masks token by token, EOS trained, one BOS, pad distinct from EOS, and clear errors on bad rows."""

from __future__ import annotations

import copy
import json

import pytest
from tokenizers import processors

from qlora_kit import data
from qlora_kit.errors import UserError
from qlora_kit.recipe import DataSource
from qlora_kit.tokenizer import ensure_pad_token, read_template

from .conftest import chat, write_jsonl


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != data.IGNORE_INDEX])


def encode(tokenizer, row: dict, fmt: str):
    return data.tokenize(tokenizer, *data.render(data.Row(row, "test row 1", fmt), fmt, tokenizer))


def test_multi_turn_masks_exactly_the_assistant_turns(demo_tokenizer):
    ids, labels = encode(demo_tokenizer, CONVERSATION, "messages")
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


@pytest.mark.parametrize(
    "content, fmt, match",
    [
        ('{"messages": []}\n{"text": ', "auto", r"x.jsonl line 2: not valid JSON"),
        ('{"prompt": "a"}\n', "prompt_completion", r"x.jsonl line 1: missing column 'completion'"),
        (
            '{"messages": [{"role": "robot", "content": "a"}]}\n',
            "messages",
            r"line 1: messages\[0\] has unknown role 'robot'",
        ),
        ('{"messages": []}\n', "messages", r"line 1: 'messages' must be a non-empty list"),
        (
            '{"messages": [{"role": "user", "content": "a"}]}\n',
            "messages",
            r"line 1: the conversation has no assistant",
        ),
        ("\n", "auto", r"has no rows"),
        ('{"foo": 1}\n', "auto", r"cannot tell the format from columns \['foo'\]"),
    ],
)
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


# ---------------------------------------------------------------------------------------------------------------
# Shipped chat templates: masks token by token on a multi-turn conversation with a system prompt

TEMPLATE_TOKENS = [
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[INST]",
    "[/INST]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
]
CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 plus 4?"},
        {"role": "assistant", "content": "8"},
    ]
}
E = "<|endoftext|>"  # the demo tokenizer's BOS and EOS
# (text, trained) pieces of each template's rendering, written out by hand from the formats' documentation.
EXPECTED = {
    "chatml": [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
        ),
        ("5<|im_end|>\n", True),
        ("<|im_start|>user\nAnd 4 plus 4?<|im_end|>\n<|im_start|>assistant\n", False),
        ("8<|im_end|>\n", True),
    ],
    "llama-3": [
        (
            f"{E}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        ("5<|eot_id|>", True),
        (
            "<|start_header_id|>user<|end_header_id|>\n\nAnd 4 plus 4?<|eot_id|><|start_header_id|>assistant"
            "<|end_header_id|>\n\n",
            False,
        ),
        ("8<|eot_id|>", True),
    ],
    "mistral": [
        (f"{E}[INST] Be brief.\n\nWhat is 2 plus 3? [/INST]", False),
        (f" 5{E}", True),
        ("[INST] And 4 plus 4? [/INST]", False),
        (f" 8{E}", True),
    ],
    "gemma": [
        (f"{E}<start_of_turn>user\nBe brief.\n\nWhat is 2 plus 3?<end_of_turn>\n<start_of_turn>model\n", False),
        ("5<end_of_turn>\n", True),
        ("<start_of_turn>user\nAnd 4 plus 4?<end_of_turn>\n<start_of_turn>model\n", False),
        ("8<end_of_turn>\n", True),
    ],
    "phi-3": [
        ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n", False),
        ("5<|end|>\n", True),
        ("<|user|>\nAnd 4 plus 4?<|end|>\n<|assistant|>\n", False),
        ("8<|end|>\n", True),
    ],
    "qwen": [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
        ),
        ("5<|im_end|>\n", True),
        ("<|im_start|>user\nAnd 4 plus 4?<|im_end|>\n<|im_start|>assistant\n", False),
        ("8<|im_end|>\n", True),
    ],
}


@pytest.fixture(scope="module")
def template_tokenizer(demo_tokenizer):
    """The demo tokenizer with the shipped templates' markers as special tokens, as their real tokenizers have."""
    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": TEMPLATE_TOKENS})
    return tokenizer


def expected_tokens(tokenizer, pieces):
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [data.IGNORE_INDEX] * len(piece)
    return ids, labels


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_template_masks_token_by_token(template_tokenizer, name):
    from qlora_kit.tokenizer import end_of_turn_ids, shipped_templates

    assert name in shipped_templates()
    template_tokenizer.chat_template = read_template(name)
    ids, labels = encode(template_tokenizer, CONVERSATION, "messages")
    assert (ids, labels) == expected_tokens(template_tokenizer, EXPECTED[name])
    # Each answer ends with a token generation stops on, and that token is trained.
    trained = [label for label in labels if label != data.IGNORE_INDEX]
    assert any(t in end_of_turn_ids(template_tokenizer) for t in trained[-2:])


def test_template_with_generation_markers_gives_the_same_masks(template_tokenizer):
    template_tokenizer.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
        "{%- generation -%}{{ m['content'] + '<|im_end|>\\n' }}{%- endgeneration -%}{%- else -%}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )
    expected = expected_tokens(template_tokenizer, EXPECTED["chatml"])
    assert encode(template_tokenizer, CONVERSATION, "messages") == expected


def test_template_that_breaks_the_prefix_property_still_trains_end_of_turn(template_tokenizer):
    """A Phi-3-style template that writes EOS only after the last turn: rendering a prefix is not a prefix of the
    whole, so spans come from the content plus the end-of-turn markers after it."""
    template_tokenizer.chat_template = read_template("phi-3").replace(
        "{%- if add_generation_prompt -%}",
        "{%- if not add_generation_prompt -%}{{ eos_token }}{%- endif -%}\n{%- if add_generation_prompt -%}",
    )
    ids, labels = encode(template_tokenizer, CONVERSATION, "messages")
    pieces = [
        EXPECTED["phi-3"][0],
        ("5<|end|>", True),
        ("\n<|user|>\nAnd 4 plus 4?<|end|>\n<|assistant|>\n", False),
        (f"8<|end|>\n{E}", True),
    ]
    assert (ids, labels) == expected_tokens(template_tokenizer, pieces)


def test_llama3_template_with_bos_adding_tokenizer_has_one_bos(bos_tokenizer):
    bos_tokenizer.chat_template = read_template("llama-3")
    ids, labels = encode(bos_tokenizer, chat("hi", "yo"), "messages")
    bos = bos_tokenizer.bos_token_id
    # The demo tokenizer's BOS is also its EOS, which ends the example: no BOS anywhere else.
    assert ids[0] == bos and bos not in ids[1:-1] and ids[-1] == bos_tokenizer.eos_token_id
    assert labels[0] == data.IGNORE_INDEX


def test_mistral_template_rejects_non_alternating_roles_as_a_row_error(template_tokenizer):
    template_tokenizer.chat_template = read_template("mistral")
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
    }
    with pytest.raises(data.RowError, match="test row 1: the chat template rejects this conversation: roles must"):
        encode(template_tokenizer, row, "messages")


# ---------------------------------------------------------------------------------------------------------------
# Formats


def test_sharegpt_renders_like_messages(demo_tokenizer):
    turns = [
        ("system", "Be brief."),
        ("human", "What is 2 plus 3?"),
        ("gpt", "5"),
        ("human", "And 4 plus 4?"),
        ("gpt", "8"),
    ]
    sharegpt = {"conversations": [{"from": who, "value": text} for who, text in turns]}
    assert encode(demo_tokenizer, sharegpt, "sharegpt") == encode(demo_tokenizer, CONVERSATION, "messages")
    assert data.detect_format([data.Row(sharegpt, "r")], "auto", "x") == "sharegpt"
    # Extra keys per turn (OpenHermes' "weight") are ignored, and an empty system turn is dropped, not rendered.
    padded = {"conversations": [{"from": "system", "value": "", "weight": None}] + sharegpt["conversations"][1:]}
    without_system = {"messages": CONVERSATION["messages"][1:]}
    assert encode(demo_tokenizer, padded, "sharegpt") == encode(demo_tokenizer, without_system, "messages")


def test_alpaca_with_and_without_input(demo_tokenizer):
    with_input = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    text, spans = data.render(data.Row(with_input, "r"), "alpaca", demo_tokenizer)
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5" in text
    assert [text[s:e] for s, e in spans] == ["5"]
    for empty in ({"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "Say hi.", "output": "hi"}):
        text, spans = data.render(data.Row(empty, "r"), "alpaca", demo_tokenizer)
        assert "Input" not in text and text.endswith("### Instruction:\nSay hi.\n\n### Response:\nhi")
        assert [text[s:e] for s, e in spans] == ["hi"]
    ids, labels = encode(demo_tokenizer, with_input, "alpaca")
    assert trained_text(demo_tokenizer, ids, labels) == "5<|endoftext|>"
    assert data.detect_format([data.Row(with_input, "r")], "auto", "x") == "alpaca"


def test_column_mapping(tmp_path, demo_tokenizer):
    write_jsonl(tmp_path / "m.jsonl", [{"convo": chat("hi", "yo")["messages"], "id": 1}])
    source = DataSource(path=str(tmp_path / "m.jsonl"), columns={"messages": "convo"})
    rows = data.read_formatted(source, "data.train.0")
    assert rows[0].fmt == "messages" and rows[0].data == chat("hi", "yo")
    write_jsonl(tmp_path / "bad.jsonl", [{"dialogue": []}])
    bad = DataSource(path=str(tmp_path / "bad.jsonl"), format="messages", columns={"messages": "convo"})
    with pytest.raises(UserError, match=r"bad.jsonl line 1: missing column 'convo' that format 'messages' needs"):
        data.read_formatted(bad, "data.train.0")


def test_directories_globs_and_text_files(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first line\n\nsecond paragraph\nstill second\n")
    (folder / "sub" / "b.txt").write_text("other file\n")
    write_jsonl(folder / "c.jsonl", [{"text": "from jsonl"}])
    (folder / "notes.md").write_text("ignored: not a data file")
    texts = [r.data["text"] for r in data.read_source(DataSource(path=str(folder)))]
    assert texts == ["first line", "second paragraph", "still second", "from jsonl", "other file"]
    by_paragraph = data.read_source(DataSource(path=str(folder / "*.txt"), sample_by="paragraph"))
    assert [r.data["text"] for r in by_paragraph] == ["first line", "second paragraph\nstill second"]
    assert [r.where.rsplit(" ", 1)[-1] for r in by_paragraph] == ["1", "3"]
    whole = data.read_source(DataSource(path=str(folder / "**" / "*.txt"), sample_by="document"))
    assert [r.data["text"] for r in whole] == ["first line\n\nsecond paragraph\nstill second\n", "other file\n"]
    with pytest.raises(UserError, match=r"the pattern matches no"):
        data.read_source(DataSource(path=str(folder / "*.csv")))
    with pytest.raises(UserError, match=r"the directory holds no"):
        (tmp_path / "empty").mkdir()
        data.read_source(DataSource(path=str(tmp_path / "empty")))


def test_hub_source_that_cannot_be_loaded_is_a_user_error():
    with pytest.raises(
        UserError,
        match=r"data source 'nobody/no-such-dataset': not a local file and could not be "
        r"loaded from the hub",
    ):
        data.read_source(DataSource(path="nobody/no-such-dataset", name="default", split="train", revision="main"))


@pytest.mark.parametrize(
    "name, content, fmt, match",
    [
        ("x.json", '[{"text": "a"}, ', "auto", r"x.json: not valid JSON at line 1"),
        ("x.csv", 'text,other\n"a,1\n', "auto", r"x.csv: not a valid CSV file"),
        (
            "x.jsonl",
            '{"conversations": [{"from": "bot", "value": "a"}]}\n',
            "auto",
            r"x.jsonl line 1: conversations\[0\] has unknown role 'bot'",
        ),
        (
            "x.jsonl",
            '{"conversations": []}\n',
            "sharegpt",
            r"x.jsonl line 1: 'conversations' must be a non-empty list",
        ),
        (
            "x.jsonl",
            '{"instruction": "a"}\n',
            "alpaca",
            r"x.jsonl line 1: missing column 'output' that format 'alpaca'",
        ),
        ("x.json", "[]", "auto", r"x.json has no rows"),
        ("x.csv", "text\n", "auto", r"x.csv has no rows"),
    ],
)
def test_more_bad_inputs(tmp_path, name, content, fmt, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        data.read_formatted(DataSource(path=str(path), format=fmt), "data.train.0")


def test_bad_rows_are_skipped_up_to_the_limit(tmp_path):
    rows = [chat("a", "b"), {"messages": [{"role": "robot", "content": "x"}]}, chat("c", "d"), {"messages": []}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    (tmp_path / "x.jsonl").write_text(path.read_text() + "{not json\n")
    bad = data.BadRows(limit=3)
    kept = data.read_formatted(DataSource(path=str(path)), "data.train.0", bad)
    assert [r.data for r in kept] == [chat("a", "b"), chat("c", "d")]
    assert bad.reasons == {"unknown role": 1, "empty conversation": 1, "invalid JSON": 1}
    with pytest.raises(
        UserError,
        match=r"x.jsonl line 5: not valid JSON .* \(3 bad rows, more than "
        r"data.max_bad_rows=2\)",
    ):
        data.read_formatted(DataSource(path=str(path)), "data.train.0", data.BadRows(limit=2))
