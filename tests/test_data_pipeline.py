"""The data pipeline as a whole: mixing, hold-out, dedupe, the content-addressed cache, worker processes, packing
without cross-contamination, `qlora-kit data`, and training with packing on."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import torch
import yaml

from qlora_kit import cli, data
from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit.data import build
from qlora_kit.errors import UserError
from qlora_kit.recipe import load_recipe, validate

from .conftest import chat, tiny_recipe, write_jsonl


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))


def recipe_for(tmp_path, model_dir, train: list[dict], **data_options):
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": train, **data_options},
        "training": {"report_to": "none"},
    }
    return validate(raw)


def text_rows(prefix: str, count: int) -> list[dict]:
    return [{"text": f"{prefix} {i}"} for i in range(count)]


def source_of(row: data.Row) -> str:
    return row.where.rsplit("/", 1)[-1].split(".")[0]


# ---------------------------------------------------------------------------------------------------------------
# Rows: mixing, hold-out, dedupe


def test_mixing_weights_and_fractions_give_the_stated_proportions(tmp_path, tiny_model_dir):
    a = write_jsonl(tmp_path / "a.jsonl", text_rows("a", 90))
    b = write_jsonl(tmp_path / "b.jsonl", text_rows("b", 30))
    c = write_jsonl(tmp_path / "c.jsonl", text_rows("c", 40))
    recipe = recipe_for(
        tmp_path,
        tiny_model_dir,
        [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 2}, {"path": str(c), "fraction": 0.25}],
        seed=3,
    )
    stats = data.DataStats()
    rows, held = build.collect_rows(recipe, stats, data.BadRows())
    counts = Counter(source_of(row) for row in rows)
    # a and b share their combined 120 rows 1:2 (b is repeated to get there); c gives a quarter of itself.
    assert counts == {"a": 40, "b": 80, "c": 10} and held == []
    assert stats.used == {str(a): 40, str(b): 80, str(c): 10} and stats.rows == {str(a): 90, str(b): 30, str(c): 40}
    b_texts = Counter(row.data["text"] for row in rows if source_of(row) == "b")
    assert len(b_texts) == 30 and set(b_texts.values()) <= {2, 3}  # every b row at least twice, none left out
    again, _ = build.collect_rows(recipe, data.DataStats(), data.BadRows())
    assert [r.data for r in again] == [r.data for r in rows]  # deterministic for a seed
    other = recipe.model_copy(update={"data": recipe.data.model_copy(update={"seed": 4})})
    reseeded, _ = build.collect_rows(other, data.DataStats(), data.BadRows())
    assert [r.data for r in reseeded] != [r.data for r in rows]


def test_eval_split_is_seeded_per_source_and_disjoint(tmp_path, tiny_model_dir):
    a = write_jsonl(tmp_path / "a.jsonl", text_rows("a", 50))
    b = write_jsonl(tmp_path / "b.jsonl", text_rows("b", 30))
    recipe = recipe_for(tmp_path, tiny_model_dir, [{"path": str(a)}, {"path": str(b)}], eval_split=0.1)
    rows, held = build.collect_rows(recipe, data.DataStats(), data.BadRows())
    assert Counter(source_of(r) for r in held) == {"a": 5, "b": 3} and len(rows) == 72
    assert not {r.data["text"] for r in held} & {r.data["text"] for r in rows}
    _, again = build.collect_rows(recipe, data.DataStats(), data.BadRows())
    assert [r.data for r in again] == [r.data for r in held]


def test_dedupe_drops_repeats_and_training_copies_of_held_out_rows(tmp_path, tiny_model_dir):
    a = write_jsonl(tmp_path / "a.jsonl", [chat("x", "1"), chat("x", "1"), chat("y", "2"), chat("z", "3")])
    b = write_jsonl(tmp_path / "b.jsonl", [chat("y", "2"), chat("w", "4")])
    held = write_jsonl(tmp_path / "held.jsonl", [chat("z", "3")])
    recipe = recipe_for(
        tmp_path, tiny_model_dir, [{"path": str(a)}, {"path": str(b)}], eval={"path": str(held)}, dedupe=True
    )
    stats = data.DataStats()
    rows, held_rows = build.collect_rows(recipe, stats, data.BadRows())
    assert sorted(r.data["messages"][0]["content"] for r in rows) == ["w", "x", "y"]
    assert stats.duplicates == 3 and len(held_rows) == 1


# ---------------------------------------------------------------------------------------------------------------
# The cache


def test_cache_hits_when_nothing_changed_and_misses_on_template_or_data_bytes(
    tmp_path, tiny_model_dir, demo_tokenizer
):
    from qlora_kit.tokenizer import load_tokenizer

    path = write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    held = write_jsonl(tmp_path / "held.jsonl", [chat("what?", "this")])
    raw = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [{"path": str(path)}], "eval": {"path": str(held)}, "max_length": 128},
    }
    recipe = validate(raw)
    first = data.build_datasets(recipe, load_tokenizer(recipe))
    second = data.build_datasets(recipe, load_tokenizer(recipe))
    assert (first.stats.cache, second.stats.cache) == ("miss", "hit")
    assert second.stats.cache_path == first.stats.cache_path
    assert second.stats.cache_path.startswith(str(tmp_path / "cache" / "data"))
    assert second.train[:] == first.train[:] and second.eval[:] == first.eval[:]
    assert [r.data for r in second.eval_rows] == [r.data for r in first.eval_rows]
    assert second.stats.as_dict() | {"cache": "miss"} == first.stats.as_dict()

    templated = validate({**raw, "model": {**raw["model"], "chat_template": "llama-3"}})
    assert data.build_datasets(templated, load_tokenizer(templated)).stats.cache == "miss"
    path.write_bytes(path.read_bytes().replace(b"a19", b"a18"))  # one byte of the data
    changed = data.build_datasets(recipe, load_tokenizer(recipe))
    assert changed.stats.cache == "miss" and changed.stats.cache_path != first.stats.cache_path
    longer = validate({**raw, "data": {**raw["data"], "max_length": 129}})
    assert data.build_datasets(longer, load_tokenizer(longer)).stats.cache == "miss"
    # The recipe field wins over the environment, and an entry is a whole folder with nothing partial beside it.
    elsewhere = validate({**raw, "data": {**raw["data"], "cache_dir": str(tmp_path / "mine")}})
    assert data.build_datasets(elsewhere, demo_tokenizer).stats.cache_path.startswith(str(tmp_path / "mine"))
    entries = list((tmp_path / "cache" / "data").iterdir())
    assert len(entries) == 4 and all((e / "stats.json").is_file() for e in entries)


def test_moved_data_misses_so_statistics_name_the_current_path(tmp_path, tiny_model_dir, demo_tokenizer):
    rows = [chat(f"q{i}", f"a{i}") for i in range(6)]
    first, moved = write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", rows)
    built = [
        data.build_datasets(recipe_for(tmp_path, tiny_model_dir, [{"path": str(p)}]), demo_tokenizer)
        for p in (first, moved)
    ]
    assert [b.stats.cache for b in built] == ["miss", "miss"]
    assert list(built[1].stats.rows) == [str(moved)]


def test_bad_input_leaves_nothing_in_the_cache(tmp_path, tiny_model_dir, demo_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [chat("a", "b"), {"messages": [{"role": "user", "content": "?"}]}])
    recipe = recipe_for(tmp_path, tiny_model_dir, [{"path": str(path)}])
    with pytest.raises(UserError, match="train.jsonl line 2: the conversation has no assistant message"):
        data.build_datasets(recipe, demo_tokenizer)
    assert build.cache_entries(tmp_path / "cache" / "data") == []
    assert not (tmp_path / "cache" / "data").exists() or not any((tmp_path / "cache" / "data").iterdir())


def test_worker_processes_give_the_same_result(tmp_path, tiny_model_dir, demo_tokenizer, monkeypatch):
    monkeypatch.setattr(build, "CHUNK", 16)  # several chunks from a small file
    rows = [chat(f"question {i}", "answer " * (i % 7)) for i in range(60)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    one = data.build_datasets(
        recipe_for(tmp_path, tiny_model_dir, [{"path": str(path)}], num_proc=1, cache=False), demo_tokenizer
    )
    two = data.build_datasets(
        recipe_for(tmp_path, tiny_model_dir, [{"path": str(path)}], num_proc=2, cache=False), demo_tokenizer
    )
    assert one.train[:] == two.train[:] and one.stats.as_dict() == two.stats.as_dict()
    assert build.processes_for(100, None) == 1 and build.processes_for(100, 3) == 3


def test_template_errors_count_against_the_bad_row_budget(tmp_path, tiny_model_dir):
    from qlora_kit.tokenizer import load_tokenizer

    rows = [
        chat("a", "b"),
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "user", "content": "y"},
                {"role": "assistant", "content": "z"},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    raw = {
        "model": {"name_or_path": str(tiny_model_dir), "chat_template": "mistral"},
        "data": {"train": [{"path": str(path)}], "max_bad_rows": 1},
    }
    prepared = data.build_datasets(validate(raw), load_tokenizer(validate(raw)))
    assert prepared.stats.skipped == {"chat template error": 1} and len(prepared.train) == 1
    raw["data"]["max_bad_rows"] = 0
    with pytest.raises(UserError, match="train.jsonl line 2: the chat template rejects this conversation"):
        data.build_datasets(validate(raw), load_tokenizer(validate(raw)))


# ---------------------------------------------------------------------------------------------------------------
# Packing


def mixed_length_dataset(count: int, seed: int = 0):
    import datasets

    rng = random.Random(seed)
    ids = [[rng.randrange(10, 600) for _ in range(rng.randint(4, 100))] for _ in range(count)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def test_packing_reaches_095_efficiency_on_mixed_lengths():
    dataset = mixed_length_dataset(600)
    packed = data.packing_stats(dataset, 128, "bfd")
    assert packed["tokens"] == sum(len(ids) for ids in dataset["input_ids"])  # nothing lost
    assert packed["efficiency"] >= 0.95, packed
    assert data.padding_efficiency(dataset, 8) < packed["efficiency"]


def test_packed_examples_never_attend_to_each_other(tiny_model_dir, demo_tokenizer):
    """A packed batch, collated by trl as SFTTrainer does, gives every example exactly the logits it gets alone."""
    from transformers import LlamaForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    dataset = mixed_length_dataset(12, seed=1)
    packed = pack_dataset(dataset, 128, "bfd")
    collator = DataCollatorForLanguageModeling(pad_token_id=demo_tokenizer.pad_token_id, padding_free=True)
    batch = collator([packed[i] for i in range(len(packed))])
    lengths = [n for row in packed["seq_lengths"] for n in row]
    starts = torch.tensor([0, *lengths]).cumsum(0)[:-1]
    positions = batch["position_ids"][0]
    assert (positions[starts] == 0).all() and positions.tolist() == [p for n in lengths for p in range(n)]
    assert (batch["labels"][0][starts] == data.IGNORE_INDEX).all()  # no example learns to predict the next one
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        flat = batch["input_ids"][0]
        for start, length in zip(starts.tolist(), lengths, strict=True):
            alone = model(input_ids=flat[None, start : start + length], use_cache=False).logits[0]
            torch.testing.assert_close(together[start : start + length], alone, rtol=1e-5, atol=1e-5)
        # The check can fail: without the per-example positions the examples do see each other.
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(
        leaky[starts[1] : starts[1] + lengths[1]], together[starts[1] : starts[1] + lengths[1]], atol=1e-3
    )


def test_packed_rows_collator_keeps_rows_apart_and_examples_unseen(tiny_model_dir, demo_tokenizer):
    """qlora-kit's sdpa/eager collator: one batch slot per packed row, and every example gets the logits it gets
    alone, while padding and example starts stay out of the loss."""
    from transformers import LlamaForCausalLM
    from trl.data_utils import pack_dataset

    from qlora_kit.data.collate import PackedRowsCollator, real_token_count

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    packed = pack_dataset(mixed_length_dataset(12, seed=1), 128, "bfd")
    pad = demo_tokenizer.pad_token_id
    batch = PackedRowsCollator(pad_token_id=pad)([packed[i] for i in range(len(packed))])
    rows, width = batch["input_ids"].shape
    assert rows == len(packed) > 1 and width == max(len(ids) for ids in packed["input_ids"])
    assert "attention_mask" not in batch  # the per-example mask comes from position_ids
    assert real_token_count(batch, pad) == sum(sum(lengths) for lengths in packed["seq_lengths"]) < rows * width
    with torch.no_grad():
        together = model(**{k: batch[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits
        for row, lengths in enumerate(packed["seq_lengths"]):
            start = 0
            for length in lengths:
                assert batch["position_ids"][row, start] == 0 and batch["labels"][row, start] == data.IGNORE_INDEX
                alone = model(input_ids=batch["input_ids"][row : row + 1, start : start + length], use_cache=False)
                torch.testing.assert_close(together[row, start : start + length], alone.logits[0], atol=1e-5, rtol=0)
                start += length
            assert (batch["labels"][row, start:] == data.IGNORE_INDEX).all()  # the row's padding
            assert (batch["input_ids"][row, start:] == pad).all()
        # The check can fail: without the position ids the second example of a row sees the first.
        row = next(r for r, lengths in enumerate(packed["seq_lengths"]) if len(lengths) > 1)
        first, second = packed["seq_lengths"][row][:2]
        leaky = model(input_ids=batch["input_ids"][row : row + 1], use_cache=False).logits[0]
    assert not torch.allclose(leaky[first : first + second], together[row, first : first + second], atol=1e-3)


def test_trainer_collates_packed_rows_apart_unless_the_kernel_is_varlen(tmp_path, tiny_model_dir, arithmetic_rows):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qlora_kit import model as model_stage
    from qlora_kit.data.collate import PackedRowsCollator
    from qlora_kit.train import keep_packed_rows_apart, make_trainer

    recipe = load_recipe(tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows, per_device_train_batch_size=2))
    assert recipe.training.get("packing") is None  # on by default
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    prepared = data.build_datasets(recipe, tokenizer)
    model = model_stage.attach_lora(model_stage.load_base_model(recipe, tokenizer), recipe)
    trainer = make_trainer(recipe, model, tokenizer, prepared, tmp_path / "out")
    assert isinstance(trainer.data_collator, PackedRowsCollator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and "position_ids" in batch  # two packed rows, not one long one
    assert (batch["position_ids"] == 0).sum() > 2  # several examples per row
    # A varlen kernel reads the boundaries itself: trl's one concatenated row stays (only the config is changed, no
    # step is taken, since flash-attention needs a GPU).
    model.config._attn_implementation = "flash_attention_2"
    trainer = make_trainer(recipe, model, tokenizer, prepared, tmp_path / "out")
    assert isinstance(trainer.data_collator, DataCollatorForLanguageModeling)
    assert not keep_packed_rows_apart(trainer, model, trainer.args)


def test_whole_logits_loss_equals_trls_chunked_loss_on_a_packed_batch(tmp_path, tiny_model_dir, arithmetic_rows):
    from qlora_kit import model as model_stage
    from qlora_kit.train import full_logits_fit, make_trainer

    recipe = load_recipe(tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows, per_device_train_batch_size=2))
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    prepared = data.build_datasets(recipe, tokenizer)
    model = model_stage.attach_lora(model_stage.load_base_model(recipe, tokenizer), recipe)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # both paths see the same network
    trainer = make_trainer(recipe, model, tokenizer, prepared, tmp_path / "out")
    assert trainer.full_logits_loss and full_logits_fit(trainer.args, model)  # 2 x max_length x small vocab
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trained = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
    results = []
    for whole in (True, False):
        trainer.full_logits_loss = whole
        model.zero_grad()
        model.train()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(trained))
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), grads))
    (whole_loss, whole_grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(whole_loss, chunked_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(whole_grads, chunked_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_whole_logits_only_when_they_are_small():
    from types import SimpleNamespace

    from qlora_kit.train import FULL_LOGITS_LIMIT_BYTES, full_logits_fit

    class Head(torch.nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.head = torch.nn.Linear(1, vocab, bias=False)

        def get_output_embeddings(self):
            return self.head

    def config(batch, length):  # the two SFTConfig fields the decision reads
        return SimpleNamespace(per_device_train_batch_size=batch, max_length=length)

    assert full_logits_fit(config(8, 128), Head(768))  # the demo: 8 x 128 x 768 x 4 B = 3 MiB
    assert not full_logits_fit(config(4, 2048), Head(128_256))  # Llama-3.1-8B: 4 GiB, trl's chunked head
    edge = FULL_LOGITS_LIMIT_BYTES // (4 * 1024)  # vocabulary whose 1 x 1024 float32 logits hit the limit
    assert full_logits_fit(config(1, 1024), Head(edge)) and not full_logits_fit(config(1, 1024), Head(edge + 1))


def test_train_with_packing_end_to_end(tmp_path, tiny_model_dir, arithmetic_rows):
    from qlora_kit.train import train

    recipe = load_recipe(
        tiny_recipe(
            tmp_path, tiny_model_dir, arithmetic_rows, max_steps=4, packing=True, per_device_train_batch_size=2
        )
    )
    result = train(recipe, tmp_path / "run")
    packing = result.metrics["data"]["packing"]
    assert packing["strategy"] == "bfd" and packing["examples"] == 36 and packing["sequences"] < 36
    assert result.metrics["steps"] == 4 and result.metrics["train_loss_last"] == result.metrics["train_loss_last"]
    # Every trained token of the packs entered the loss: 2 packs per step, each token counted once.
    assert 0 < result.metrics["train_tokens"] <= result.metrics["data"]["trained_tokens"]


# ---------------------------------------------------------------------------------------------------------------
# qlora-kit data


def write_recipe(tmp_path, model_dir, train_path, **data_options) -> str:
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [{"path": str(train_path)}], **data_options},
        "training": {"report_to": "none", "per_device_train_batch_size": 4},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_cli_data_shows_marked_examples_and_statistics(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's width when not a terminal: keep table rows on one line
    rows = [chat("What is 2 plus 3?", "5", system="Be brief.")] + [chat(f"q{i}", "word " * i) for i in range(30)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", [chat("q", "a")])
    recipe = write_recipe(tmp_path, tiny_model_dir, train, max_length=48, eval={"path": str(held)})
    assert cli.main(["data", recipe, "--examples", "2", "--plain", "training.packing=true"]) == 0
    out = capsys.readouterr().out
    assert "[[5<|im_end|>\n]]" in out and "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>" in out
    flat = " ".join(re.sub(r"[│┌┐└┘├┤─┬┴┼]", " ", out).split())  # the table's cells, unwrapped
    for needle in (
        "train.jsonl",
        "31 read, 31 used",
        "messages (detected from column messages)",
        "held-out rows",
        "token length",
        "p90",
        "truncated",
        "tokens trained on",
        "packing efficiency",
        "cache",
        "miss",
    ):
        assert needle in flat, needle
    assert cli.main(["data", recipe, "--examples", "0", "--plain"]) == 0
    assert "hit" in capsys.readouterr().out


def test_cli_data_colours_trained_tokens_on_a_terminal(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from rich.console import Console

    train = write_jsonl(tmp_path / "train.jsonl", [chat("hi", "yo")])
    recipe = write_recipe(tmp_path, tiny_model_dir, train)
    monkeypatch.setattr(cli, "_console", lambda: Console(force_terminal=True, color_system="standard", width=100))
    assert cli.main(["data", recipe, "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[30;42myo<|im_end|>" in out and "[[" not in out


@pytest.mark.parametrize(
    "content, match",
    [
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"messages": ',
            "train.jsonl line 2: not valid JSON",
        ),
        ('{"prompt": "a"}\n', "train.jsonl line 1: missing column 'completion' that format 'prompt_completion' needs"),
        (
            '{"messages": [{"role": "robot", "content": "a"}]}\n',
            "train.jsonl line 1: messages[0] has unknown role 'robot'",
        ),
        ('{"messages": []}\n', "train.jsonl line 1: 'messages' must be a non-empty list"),
        ("\n\n", "train.jsonl has no rows"),
    ],
)
def test_cli_data_bad_input_exits_2_with_one_error_line(tmp_path, tiny_model_dir, capsys, content, match):
    train = tmp_path / "train.jsonl"
    train.write_text(content)
    recipe = write_recipe(tmp_path, tiny_model_dir, train)
    format_option = ["data.train.0.format=prompt_completion"] if "prompt" in content else []
    assert cli.main(["data", recipe, *format_option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not (tmp_path / "cache" / "data").exists() or build.cache_entries(tmp_path / "cache" / "data") == []


def test_cli_data_skips_bad_rows_when_allowed(tmp_path, tiny_model_dir, capsys):
    rows = [chat("a", "b"), {"messages": [{"role": "robot", "content": "x"}]}, chat("c", "d")]
    recipe = write_recipe(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "train.jsonl", rows), max_bad_rows=1)
    assert cli.main(["data", recipe, "--plain"]) == 0
    assert "bad rows skipped" in (out := capsys.readouterr().out) and "unknown role: 1" in out


def test_recipes_in_the_data_docs_are_valid():
    from .conftest import REPO

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "data.md").read_text(), re.S)
    assert len(blocks) == 2
    recipes = [validate(yaml.safe_load(block)) for block in blocks]
    assert recipes[0].data.train[0].weight == 3 and recipes[0].data.train[1].columns == {"messages": "conversation"}
    assert [(s.reasoning, s.enable_thinking) for s in recipes[1].data.train] == [("train", None), ("mask", False)]
