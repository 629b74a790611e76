"""Tool calling and reasoning data: what each shipped template trains, that inference prompts are prefixes of the
training text, validation of bad rows, truncation that keeps the answer, and a model that learns to stop."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from qlora_kit import data
from qlora_kit.data.build import fit_length
from qlora_kit.errors import UserError
from qlora_kit.tokenizer import read_template, shipped_templates

from .test_data import TEMPLATE_TOKENS

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
FORMS = {
    "plain": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "tools": {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 degrees."},
        ],
    },
    "reasoning": {
        "messages": [
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3 is 5."},
        ]
    },
    "multi-turn-reasoning": {
        "messages": [
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3 is 5."},
            {"role": "user", "content": "4+4?"},
            {"role": "assistant", "content": "8", "reasoning_content": "4 plus 4 is 8."},
        ]
    },
}
QWEN3_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
# The decoded trained runs: each assistant turn's content (its tool call, its reasoning where the template shows it)
# and the end-of-turn token. Qwen3's final turn always carries a <think> block, empty when there is no reasoning (so
# it is what the model writes after the generation prompt); earlier turns lose their reasoning, as at inference.
TRAINED = {
    ("qwen3", "plain"): ["<think>\n\n</think>\n\nhello<|im_end|>\n"],
    ("qwen3", "tools"): [QWEN3_CALL, "<think>\n\n</think>\n\n21 degrees.<|im_end|>\n"],
    ("qwen3", "reasoning"): ["<think>\n2 plus 3 is 5.\n</think>\n\n5<|im_end|>\n"],
    ("qwen3", "multi-turn-reasoning"): ["5<|im_end|>", "<think>\n4 plus 4 is 8.\n</think>\n\n8<|im_end|>\n"],
    ("qwen2.5", "plain"): ["hello<|im_end|>\n"],
    ("qwen2.5", "tools"): [QWEN3_CALL + "\n", "21 degrees.<|im_end|>\n"],
    ("deepseek-r1", "plain"): ["\n</think>\n\nhello<｜end▁of▁sentence｜>"],
    ("deepseek-r1", "reasoning"): ["2 plus 3 is 5.\n</think>\n\n5<｜end▁of▁sentence｜>"],
    ("deepseek-r1", "multi-turn-reasoning"): [
        "5<｜end▁of▁sentence｜>",
        "4 plus 4 is 8.\n</think>\n\n8<｜end▁of▁sentence｜>",
    ],
    ("llama-3.1", "plain"): ["hello<|eot_id|>"],
    ("llama-3.1", "tools"): [LLAMA_CALL, "21 degrees.<|eot_id|>"],
    ("chatml", "plain"): ["hello<|im_end|>\n"],
    ("qwen", "plain"): ["hello<|im_end|>\n"],
    ("gemma", "plain"): ["hello<end_of_turn>\n"],
    ("llama-3", "plain"): ["hello<|eot_id|>"],
    ("mistral", "plain"): [" hello<|endoftext|>"],  # no generation prompt: the model writes the space; EOS ends it
    ("phi-3", "plain"): ["hello<|end|>\n"],
}
REWRITES_HISTORY = {"deepseek-r1"}
# Templates without tool support: Gemma's and Mistral's reject a tool turn outright, the others would drop it silently.
REJECTS_TOOLS = {"gemma", "mistral"}
CHAT_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CHAT_TOKENS += ["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"]  # DeepSeek-R1


@pytest.fixture(scope="module")
def chat_tokenizer(demo_tokenizer):
    """The demo tokenizer with every shipped template's markers as added tokens, as the real tokenizers have."""
    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": TEMPLATE_TOKENS + CHAT_TOKENS})
    return tokenizer


def encode(tokenizer, row: dict, chat: dict | None = None):
    canonical = data.normalize(data.Row(copy.deepcopy(row), "test row 1", "messages"), "messages", None, chat)
    return canonical, data.tokenize(tokenizer, *data.render(canonical, "messages", tokenizer))


def trained_runs(tokenizer, ids, labels) -> list[str]:
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != data.IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = [*runs, tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", shipped_templates())
def test_every_template_trains_exactly_the_answers_or_names_what_it_cannot_render(chat_tokenizer, name, form):
    chat_tokenizer.chat_template = read_template(name)
    row = FORMS[form]
    expected = TRAINED.get((name, form))
    if expected is None:
        kind = "tools" if form == "tools" else "reasoning"
        reason = (
            "rejects this conversation" if kind == "tools" and name in REJECTS_TOOLS else f"does not render {kind}"
        )
        with pytest.raises(data.RowError, match=f"test row 1: the chat template {reason}") as caught:
            encode(chat_tokenizer, row)
        assert caught.value.kind in ("template ignores tools", "template ignores reasoning", "chat template error")
        return
    canonical, (ids, labels) = encode(chat_tokenizer, row)
    assert trained_runs(chat_tokenizer, ids, labels) == expected
    # The prompt each answer is generated from at inference is exactly what precedes it in the training text; for
    # DeepSeek-R1 only the last answer's: its prompt opens <think>, which the history it renders later drops.
    text = chat_tokenizer.decode(ids)
    messages, tools = canonical.data["messages"], canonical.data.get("tools")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and (i == last or name not in REWRITES_HISTORY):
            prompt = chat_tokenizer.apply_chat_template(
                messages[:i], tools=tools, tokenize=False, add_generation_prompt=True
            )
            assert text.startswith(prompt), (name, form, i)


# Shipped template -> the published template trl bundles (trl/chat_templates/), copied from the checkpoints.
PUBLISHED = {"qwen3": "qwen3", "qwen2.5": "qwen2_5", "llama-3.1": "llama3_1"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_templates_render_exactly_as_the_published_ones(chat_tokenizer, name):
    import trl

    published = (Path(trl.__file__).parent / "chat_templates" / f"{PUBLISHED[name]}.jinja").read_text()
    rendered = 0
    for form, row in FORMS.items():
        messages, tools = row["messages"], row.get("tools")
        for end in range(2, len(messages) + 1):
            for options in ({}, {"add_generation_prompt": True}, {"enable_thinking": False}):
                texts = [
                    chat_tokenizer.apply_chat_template(
                        messages[:end], tools=tools, tokenize=False, chat_template=template, **options
                    )
                    for template in (read_template(name), published)
                ]
                assert texts[0] == texts[1], (form, end, options)
                rendered += 1
    assert rendered == 3 * (1 + 3 + 1 + 3)  # every prefix ending after the first answer, three ways


def test_deepseek_r1_prompts_match_the_published_template_which_fails_the_preflight_check(chat_tokenizer):
    """The published R1 template opens <think> in its generation prompt but renders answers without it: qlora-kit's
    pre-flight check names the mismatch; the shipped deepseek-r1 template gives the same prompts and trains the
    text that follows them."""
    import trl

    published = (Path(trl.__file__).parent / "chat_templates" / "deepseek_r1_distill.jinja").read_text()
    messages = FORMS["multi-turn-reasoning"]["messages"]
    for end in (1, 3):  # the prompts of both answers
        prompts = [
            chat_tokenizer.apply_chat_template(
                messages[:end], tokenize=False, add_generation_prompt=True, chat_template=template
            )
            for template in (read_template("deepseek-r1"), published)
        ]
        assert prompts[0] == prompts[1] and prompts[0].endswith("<｜Assistant｜><think>\n")
    row = data.normalize(data.Row(copy.deepcopy(FORMS["plain"]), "r line 1", "messages"), "messages")
    chat_tokenizer.chat_template = published
    # BOS "<|endoftext|>" 13 characters, "<｜User｜>" 8, "hi" 2, "<｜Assistant｜>" 13: they differ at 36.
    assert data.tokens.inference_mismatch(row, chat_tokenizer) == (
        "r line 1: the training text and the inference prompt differ at character 36: training has "
        "'hello<｜end▁of▁sentence｜>' where inference has '<think>\\n'"
    )
    chat_tokenizer.chat_template = read_template("deepseek-r1")
    assert data.tokens.inference_mismatch(row, chat_tokenizer) is None


def test_qwen3_reasoning_policies_and_no_think_mode(chat_tokenizer):
    chat_tokenizer.chat_template = read_template("qwen3")
    row = FORMS["reasoning"]
    _, (ids, labels) = encode(chat_tokenizer, row, {"reasoning": "mask"})
    assert trained_runs(chat_tokenizer, ids, labels) == ["5<|im_end|>\n"]
    assert "<think>\n2 plus 3 is 5.\n</think>" in chat_tokenizer.decode(ids)  # shown, not trained
    _, (ids, labels) = encode(chat_tokenizer, row, {"reasoning": "drop"})
    assert trained_runs(chat_tokenizer, ids, labels) == ["<think>\n\n</think>\n\n5<|im_end|>\n"]
    # No-think mode: the empty think block belongs to the generation prompt, so only the answer is trained.
    _, (ids, labels) = encode(chat_tokenizer, FORMS["plain"], {"template_kwargs": {"enable_thinking": False}})
    assert trained_runs(chat_tokenizer, ids, labels) == ["hello<|im_end|>\n"]
    canonical, _ = encode(chat_tokenizer, row, {"reasoning": "mask", "template_kwargs": {"enable_thinking": False}})
    prompt, reference = data.prompt_and_reference(canonical, "messages", chat_tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and reference == "5"


def test_sharegpt_function_call_and_observation_render_like_messages(chat_tokenizer):
    chat_tokenizer.chat_template = read_template("qwen3")
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "21 degrees."},
        ],
        "tools": json.dumps([WEATHER]),  # LLaMA-Factory stores tools as a JSON string
    }
    row = data.normalize(data.Row(sharegpt, "r", "sharegpt"), "sharegpt")
    assert data.render(row, "messages", chat_tokenizer) == data.render(
        data.Row(copy.deepcopy(FORMS["tools"]), "r", "messages"), "messages", chat_tokenizer
    )


BAD_ROWS = [
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{city: Paris}"}}]}]},
        "messages[1].tool_calls[0].arguments is not valid JSON", "bad tool-call JSON",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "21"},
                      {"role": "assistant", "content": "b"}]},
        "message 1 is a tool result without a preceding assistant tool call", "tool result without a call",
    ),
    (
        {"messages": [{"role": "user", "content": "a", "reasoning_content": "hm"},
                      {"role": "assistant", "content": "b"}]},
        "messages[0].reasoning_content is on a user turn", "reasoning on a non-assistant turn",
    ),
    (
        {"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "messages[0] has unknown role 'robot'", "unknown role",
    ),
    (
        {"tools": "[{not json", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "'tools' is not valid JSON", "bad tools JSON",
    ),
]  # fmt: skip


def test_bad_chat_rows_are_named_and_counted_against_max_bad_rows(tmp_path, chat_tokenizer):
    good = FORMS["tools"]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [good] + [row for row, _, _ in BAD_ROWS]))
    for line, (_, message, kind) in enumerate(BAD_ROWS, start=2):
        with pytest.raises(data.RowError, match=f"line {line}: {message}".replace("[", r"\[")) as caught:
            data.normalize(data.read_source(data_source(path))[line - 1], "messages")
        assert caught.value.kind == kind
    bad = data.BadRows(limit=len(BAD_ROWS))
    rows = data.read_formatted(data_source(path), "data.train.0", bad)
    assert len(rows) == 1 and bad.reasons == {kind: 1 for _, _, kind in BAD_ROWS}
    with pytest.raises(UserError, match=r"line 2: .*\(5 bad rows, more than data.max_bad_rows=4\)"):
        data.read_formatted(data_source(path), "data.train.0", data.BadRows(limit=len(BAD_ROWS) - 1))


def data_source(path: Path):
    from qlora_kit.recipe import DataSource

    return DataSource(path=str(path), format="messages")


def long_conversation(turns: int) -> dict:
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"What is {i} plus {i}? " + "please " * 6},
            {"role": "assistant", "content": f"{2 * i}"},
        ]
    return {"messages": messages}


@pytest.mark.parametrize("policy", ["truncate_prompt", "drop_turns", "truncate", "drop"])
def test_truncation_keeps_the_answer(chat_tokenizer, policy):
    chat_tokenizer.chat_template = read_template("chatml")
    canonical, (ids, labels) = encode(chat_tokenizer, long_conversation(4))
    full = trained_runs(chat_tokenizer, ids, labels)
    assert full == ["0<|im_end|>\n", "2<|im_end|>\n", "4<|im_end|>\n", "6<|im_end|>\n"]
    max_length = len(ids) - 20  # too long by 20 tokens; one exchange is about 25
    stats = data.DataStats()
    fitted = fit_length(canonical, ids, labels, chat_tokenizer, max_length, policy, stats)
    assert stats.truncation == {policy: 1}
    if policy == "drop":
        assert fitted is None and stats.dropped_too_long == 1
        return
    ids2, labels2 = fitted
    assert len(ids2) <= max_length
    runs = trained_runs(chat_tokenizer, ids2, labels2)
    if policy == "truncate":
        assert runs[-1] != "6<|im_end|>\n"  # cutting the end loses the last answer and its end of turn
    else:
        assert runs[-1] == "6<|im_end|>\n"
    if policy == "drop_turns":
        text = chat_tokenizer.decode(ids2)
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1 plus 1?")
        assert runs == full[1:]


def test_preflight_names_where_training_and_inference_renders_differ(tmp_path, tiny_model_dir):
    """A DeepSeek-R1-style template whose generation prompt opens a <think> block its rendered turns do not have:
    training would teach text the model never sees at inference."""
    from qlora_kit.data.build import build_datasets
    from qlora_kit.recipe import validate
    from qlora_kit.tokenizer import load_tokenizer

    template = tmp_path / "r1.jinja"
    template.write_text(
        read_template("chatml").replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
    )
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(FORMS["plain"]) + "\n")
    raw = {
        "model": {"name_or_path": str(tiny_model_dir), "chat_template": str(template)},
        "data": {"train": [{"path": str(train)}], "cache": False},
        "output_dir": str(tmp_path / "run"),
    }
    with pytest.raises(UserError) as caught:
        build_datasets(validate(raw), load_tokenizer(validate(raw)))
    # "<|im_start|>user\nhi<|im_end|>\n" is 30 characters, "<|im_start|>assistant\n" 22 more: they differ at 52.
    assert str(caught.value) == (
        "pre-flight check: 1 of 1 conversations render differently at training and at inference; first: "
        f"{train} line 1: the training text and the inference prompt differ at character 52: training has "
        "'hello<|im_end|>\\n' where inference has '<think>\\n': use a chat template whose generation prompt is what "
        "its assistant turns start with (model.chat_template), or the model's own"
    )
    raw["model"]["chat_template"] = "chatml"
    assert build_datasets(validate(raw), load_tokenizer(validate(raw))).stats.examples == 1


def test_example_files_render_and_the_docs_show_what_qlora_kit_data_prints(tmp_path, tiny_model_dir, capsys):
    import re

    from qlora_kit import cli

    from .conftest import REPO

    examples = sorted((REPO / "data" / "examples").glob("*.jsonl"))
    assert [p.name for p in examples] == ["reasoning.jsonl", "sharegpt_tools.jsonl", "tools.jsonl"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {"name_or_path": str(tiny_model_dir), "chat_template": "qwen3"},
                "data": {"train": [{"path": str(p)} for p in examples], "cache": False},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    assert cli.main(["data", str(recipe), "--plain", "--examples", "6", "training.packing=false"]) == 0
    out = capsys.readouterr().out
    assert "bad rows skipped" not in out and "training examples" in out
    flat = " ".join(re.sub(r"[│┌┐└┘├┤─┬┴┼]", " ", out).split())  # the statistics table's cells, unwrapped
    # tools.jsonl: 3 rows with tools, 2 calls, 2 results; sharegpt_tools.jsonl: 1, 1, 1; reasoning.jsonl: 3 turns.
    assert "tools and reasoning rows with tools: 4, tool calls: 3, tool results: 3, reasoning turns: 3" in flat
    docs = (REPO / "docs" / "data.md").read_text()
    shown = re.search(r"shows it \(the first row.*?```\n(.*?)```", docs, re.S).group(1)
    assert shown.strip() in out


PLAIN = {"messages": [{"role": "user", "content": "Hi there?"}, {"role": "assistant", "content": "Hello."}]}
TOOL_CALL = {
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
}  # fmt: skip
REASONING = {
    "messages": [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5", "reasoning_content": "2+3=5"},
        {"role": "user", "content": "4+4?"},
        {"role": "assistant", "content": "8", "reasoning_content": "4+4=8"},
    ]
}


def short_rows(name: str) -> list[dict]:
    """A plain conversation, and a tool call and a multi-turn reasoning one where the template renders them."""
    rows = [PLAIN]
    rows += [TOOL_CALL] if (name, "tools") in TRAINED else []
    rows += [REASONING] if (name, "multi-turn-reasoning") in TRAINED else []
    return rows


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, chat_tokenizer) -> Path:
    """A random-weight Llama of ~100k parameters whose tokenizer carries every shipped template's markers."""
    from .conftest import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("chat-llama"), chat_tokenizer, "llama")


@pytest.mark.parametrize("name", shipped_templates())
def test_generation_stops_at_end_of_turn_after_a_short_fine_tune(name, tmp_path, chat_model_dir):
    """The real stack (4-bit base, LoRA, trl) trained briefly under each shipped template: from each conversation's
    last inference prompt, greedy generation writes exactly the trained answer and stops at the template's
    end-of-turn token, long before max_new_tokens."""
    import torch
    import yaml

    from qlora_kit.recipe import load_recipe
    from qlora_kit.tokenizer import end_of_turn_ids, load_tokenizer
    from qlora_kit.train import train

    rows = short_rows(name)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = {
        "model": {"name_or_path": str(chat_model_dir), "chat_template": name},
        # A random 100k-parameter base: its output head trains too, so a few seconds of steps memorize the rows.
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "modules_to_save": ["lm_head"]},
        "data": {"train": [{"path": str(train_file), "fraction": 2}], "max_length": 128},
        "training": {
            "max_steps": 60,
            "learning_rate": 1e-2,
            "lr_scheduler_type": "constant",
            "per_device_train_batch_size": 2 * len(rows),  # every step sees every row twice
            "packing": False,
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 10,
        },
        "eval": {"num_samples": 0},
    }
    recipe["data"]["cache"] = False
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    result = train(recipe, tmp_path / "run")
    model = result.model.eval()
    tokenizer = load_tokenizer(recipe)
    stops = end_of_turn_ids(tokenizer)
    for row in rows:
        canonical, (ids, labels) = encode(tokenizer, row)
        last_start = max(i for i, label in enumerate(labels) if label == data.IGNORE_INDEX) + 1
        trained = ids[last_start:]
        answer = trained[: next(i for i, t in enumerate(trained) if t in stops) + 1]  # up to its end-of-turn token
        prompt, _ = data.prompt_and_reference(canonical, "messages", tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert ids[:last_start] == prompt_ids, name  # the inference prompt is the training text before the answer
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt_ids]), max_new_tokens=40, do_sample=False, eos_token_id=stops
            )
        new = out[0, len(prompt_ids) :].tolist()
        assert new == answer, (
            name,
            tokenizer.decode(new),
            tokenizer.decode(answer),
            result.metrics["train_loss_last"],
        )
