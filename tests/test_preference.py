"""Preference tuning: recipe checks, data formats and tokens, every method training on a real 4-bit tiny model, and the
reference model living inside the one policy model (no second base)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_kit.data import preference
from qlora_kit.errors import UserError
from qlora_kit.recipe import load_recipe, validate

from .conftest import REPO, sum_pairs, unpaired, write_jsonl


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))


def preference_recipe(tmp_path, model_dir, method: str, rows: list[dict], held: list[dict], **training) -> dict:
    train = write_jsonl(tmp_path / f"{method}-train.jsonl", rows)
    evaluation = write_jsonl(tmp_path / f"{method}-eval.jsonl", held)
    return {
        "method": method,
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"train": [{"path": str(train)}], "eval": {"path": str(evaluation)}, "max_length": 64},
        "training": {
            "max_steps": 8,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "per_device_train_batch_size": 8,
            "report_to": "none",
            "save_strategy": "no",
            "gradient_checkpointing": False,
            **training,
        },
        "eval": {"batch_size": 16, "num_samples": 2, "max_new_tokens": 4, "metrics": ["exact_match"]},
        "output_dir": str(tmp_path / f"run-{method}"),
    }


def write_recipe(tmp_path, raw: dict, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Recipe


def test_training_is_checked_against_the_methods_trl_config():
    base = {"model": {"name_or_path": "m"}, "data": {"train": [{"path": "d.jsonl"}]}}
    with pytest.raises(UserError) as caught:
        validate({**base, "method": "dpo", "training": {"betaa": 0.1, "packing": True, "truncation_mode": "x"}})
    message = str(caught.value)
    assert "training.betaa: not a field of trl's DPOConfig (did you mean 'beta'?)" in message
    assert "training.packing: not a field of trl's DPOConfig" in message
    assert "training.truncation_mode: set it in nothing: qlora-kit truncates the prompt" in message
    with pytest.raises(UserError, match="training.loss_type: method simpo fixes it to 'simpo'"):
        validate({**base, "method": "simpo", "training": {"loss_type": "sigmoid"}})
    with pytest.raises(UserError, match="training.desirable_weight: not a field of trl's ORPOConfig"):
        validate({**base, "method": "orpo", "training": {"desirable_weight": 1.0}})
    with pytest.raises(UserError, match="model.adapter: training an existing adapter further is for preference"):
        validate({**base, "model": {"name_or_path": "m", "adapter": "runs/sft"}})
    # trl's own validation, reported under the recipe key before any weight loads
    with pytest.raises(UserError, match="training.loss_weights: `loss_weights` must have the same length"):
        validate({**base, "method": "dpo", "training": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}})
    recipe = validate({**base, "method": "kto", "training": {"beta": 0.2, "desirable_weight": 1.5}})
    assert recipe.method == "kto" and recipe.training["desirable_weight"] == 1.5


# ---------------------------------------------------------------------------------------------------------------
# Data


def build(tmp_path, tiny_model_dir, rows, method="dpo", held=None, **data):
    from qlora_kit.tokenizer import load_tokenizer

    raw = preference_recipe(tmp_path, tiny_model_dir, method, rows, rows[:2] if held is None else held)
    raw["data"].update(data)
    recipe = load_recipe(write_recipe(tmp_path, raw))
    tokenizer = load_tokenizer(recipe)
    return preference.build(recipe, tokenizer), tokenizer


def test_string_conversation_and_shared_prefix_pairs_render_alike(tmp_path, tiny_model_dir):
    conversation = sum_pairs(1)[0]
    prompt = conversation["prompt"]
    shared = {"chosen": prompt + conversation["chosen"], "rejected": prompt + conversation["rejected"], "prompt": "x"}
    built, tokenizer = build(tmp_path, tiny_model_dir, [conversation, shared])
    a, b = built.train[0], built.train[1]
    assert a == b  # UltraFeedback-style full conversations: the shared leading messages are the prompt
    assert tokenizer.decode(a["prompt_ids"]).endswith(
        tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    )
    stops = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>"])}
    assert a["chosen_ids"][-1] in stops or a["chosen_ids"][-2] in stops  # the answer ends its turn
    assert a["prompt_ids"].count(tokenizer.bos_token_id) <= 1
    text, _ = build(tmp_path, tiny_model_dir, sum_pairs(2, conversational=False))
    assert text.train[0]["chosen_ids"][-1] == tokenizer.eos_token_id  # plain text answers get EOS, as in SFT
    assert text.stats.formats and set(text.stats.formats.values()) == {"preference"}


def test_long_prompt_is_cut_from_the_left_first(tmp_path, tiny_model_dir):
    long_prompt = "word " * 200 + "What is 2 plus 2?"
    row = {"prompt": long_prompt, "chosen": "4", "rejected": "5"}
    built, tokenizer = build(tmp_path, tiny_model_dir, [row, *sum_pairs(2, conversational=False)])
    example = built.train[0]
    assert len(example["prompt_ids"]) + len(example["chosen_ids"]) <= 64
    assert tokenizer.decode(example["prompt_ids"]).endswith("What is 2 plus 2?")  # the end of the prompt survives
    assert tokenizer.decode(example["chosen_ids"]).startswith("4")
    assert built.stats.truncated == 2  # the row is trained on and, as one of rows[:2], held out


def test_unpaired_rows_for_kto(tmp_path, tiny_model_dir):
    built, _ = build(tmp_path, tiny_model_dir, unpaired(sum_pairs(3)), method="kto")
    assert built.train.column_names == ["prompt_ids", "completion_ids", "label"]
    assert built.train["label"] == [True, False] * 3
    with pytest.raises(UserError, match="train with method: kto, not dpo"):
        build(tmp_path, tiny_model_dir, unpaired(sum_pairs(3)), method="dpo")


def test_kto_unpairs_pairs_into_the_rows_trl_makes(tmp_path, tiny_model_dir):
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    long_prompt = [{"role": "user", "content": "word " * 200 + "What is 2 plus 2?"}]
    pairs = [*sum_pairs(4), {**sum_pairs(1, seed=3)[0], "prompt": long_prompt}]
    held = sum_pairs(2, seed=9)
    from_pairs, tokenizer = build(tmp_path, tiny_model_dir, pairs, method="kto", held=held)
    # trl's own helper on the raw pairs, written as KTO's native unpaired rows, tokenizes to the very same rows.
    rows = unpair_preference_dataset(Dataset.from_list(pairs)).to_list()
    native, _ = build(tmp_path, tiny_model_dir, rows, method="kto", held=held)
    assert from_pairs.train.to_list() == native.train.to_list()
    assert from_pairs.train.column_names == ["prompt_ids", "completion_ids", "label"]
    assert from_pairs.train["label"] == [True] * 5 + [False] * 5  # trl's order: the chosen rows, then the rejected
    for index, pair in enumerate(pairs):
        for row, side in ((from_pairs.train[index], "chosen"), (from_pairs.train[5 + index], "rejected")):
            assert tokenizer.decode(row["completion_ids"]) == pair[side][0]["content"] + "<|im_end|>\n"
            question = pair["prompt"][0]["content"][-len("What is 2 plus 2?") :]  # what a cut prompt keeps
            assert tokenizer.decode(row["prompt_ids"]).endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n")
            assert len(row["prompt_ids"]) + len(row["completion_ids"]) <= 64
    long_rows = (from_pairs.train[4], from_pairs.train[9])
    assert all(
        len(r["prompt_ids"]) == 64 - len(r["completion_ids"]) for r in long_rows
    )  # its prompt cut from the left
    assert (from_pairs.stats.truncated, from_pairs.stats.unpaired_pairs, native.stats.unpaired_pairs) == (2, 5, 0)
    assert from_pairs.eval.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]  # held-out pairs score rewards
    again, _ = build(tmp_path, tiny_model_dir, pairs, method="kto", held=held)
    assert again.stats.cache == "hit" and again.train.to_list() == from_pairs.train.to_list()
    assert again.stats.unpaired_pairs == 5 and from_pairs.stats.cache_path != native.stats.cache_path
    # A prompt and chosen answer that two pairs share is one desirable row; a held-out pair's answers are not trained.
    shared = [pairs[0], {**pairs[0], "rejected": [{"role": "assistant", "content": "no idea"}]}, held[0]]
    deduped, _ = build(tmp_path, tiny_model_dir, shared, method="kto", held=held, dedupe=True)
    assert deduped.train["label"] == [True, False, False]
    assert (deduped.stats.duplicates, deduped.stats.unpaired_pairs) == (2, 2)  # the held-out pair, the shared row
    # With eval_split, a pair is held out whole and stays a pair.
    split, _ = build(tmp_path, tiny_model_dir, sum_pairs(8), method="kto", eval=None, eval_split=0.25)
    assert len(split.train) == 2 * 6 and len(split.eval_rows) == 2 and split.eval_rows[0].fmt == "preference"
    # Held out beside a source of unpaired rows, the held-out pairs are unpaired too: one dataset holds them all.
    native_file = write_jsonl(tmp_path / "native.jsonl", unpaired(sum_pairs(4, seed=7)))
    mixed, _ = build(tmp_path, tiny_model_dir, sum_pairs(8), method="kto", eval=None, eval_split=0.25,
                     train=[{"path": str(tmp_path / "kto-train.jsonl")}, {"path": str(native_file)}])  # fmt: skip
    assert {row.fmt for row in mixed.eval_rows} == {"unpaired"} and len(mixed.eval_rows) == 2 * 2 + 2
    assert len(mixed.train) == 2 * 6 + 6 and mixed.eval.column_names == ["prompt_ids", "completion_ids", "label"]


def test_tokenized_pairs_are_cached_and_any_changed_input_misses(tmp_path, tiny_model_dir):
    rows = sum_pairs(6)
    first, _ = build(tmp_path, tiny_model_dir, rows)
    second, _ = build(tmp_path, tiny_model_dir, rows)
    assert (first.stats.cache, second.stats.cache) == ("miss", "hit")
    assert second.stats.cache_path == first.stats.cache_path
    assert second.stats.cache_path.startswith(str(tmp_path / "cache" / "data"))
    assert second.train.to_list() == first.train.to_list() and second.eval.to_list() == first.eval.to_list()
    assert [r.data for r in second.eval_rows] == [r.data for r in first.eval_rows]
    assert second.stats.as_dict() | {"cache": "miss"} == first.stats.as_dict()
    changed, _ = build(tmp_path, tiny_model_dir, [*rows[:-1], *sum_pairs(1, seed=5)])  # other bytes
    shorter, _ = build(tmp_path, tiny_model_dir, rows, max_length=16)  # another data option
    off, _ = build(tmp_path, tiny_model_dir, rows, cache=False)
    assert (changed.stats.cache, shorter.stats.cache, off.stats.cache) == ("miss", "miss", "off")
    assert len({first.stats.cache_path, changed.stats.cache_path, shorter.stats.cache_path}) == 3
    key = json.loads((Path(first.stats.cache_path) / "key.json").read_text())
    assert key["extra"] == {"pipeline": preference.PIPELINE_VERSION, "method": "dpo"}


@pytest.mark.parametrize("method", ["dpo", "kto"])  # KTO checks the pairs it unpairs as DPO does
@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen equals rejected"),
        ({"prompt": "q", "chosen": "a"}, "the pair has no 'rejected' answer"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "the pair has no 'chosen' answer"),
    ],
)
def test_bad_pairs_are_named_and_counted(tmp_path, tiny_model_dir, bad, reason, method):
    rows = [*sum_pairs(2, conversational=False), bad]
    with pytest.raises(UserError, match=rf"{method}-train.jsonl line 3: {reason}"):
        build(tmp_path, tiny_model_dir, rows, method)
    built, _ = build(tmp_path, tiny_model_dir, rows, method, max_bad_rows=1)
    assert built.stats.rows == (2 if method == "dpo" else 4) and sum(built.stats.bad_rows.values()) == 1


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_bad_preference_data_exits_2_naming_file_and_row(tmp_path, tiny_model_dir, method):
    rows = [*sum_pairs(3), {"prompt": "q", "chosen": "a", "rejected": "a"}]
    path = write_recipe(tmp_path, preference_recipe(tmp_path, tiny_model_dir, method, rows, rows[:2]))
    result = subprocess.run(
        [sys.executable, "-m", "qlora_kit", "train", path], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and f"{method}-train.jsonl line 4: chosen equals rejected" in lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Training


METHODS = {
    "dpo": {"beta": 0.1},
    "orpo": {"beta": 0.1},
    "simpo": {"beta": 2.0},
    "kto": {"beta": 0.1},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_and_lowers_its_loss(tmp_path, tiny_model_dir, method):
    from qlora_kit.preference import train

    rows, held = sum_pairs(32), sum_pairs(16, seed=1)
    if method == "kto":
        rows = unpaired(rows)
    raw = preference_recipe(tmp_path, tiny_model_dir, method, rows, held, **METHODS[method])
    recipe = load_recipe(write_recipe(tmp_path, raw))
    result = train(recipe, tmp_path / "run")
    metrics = result.metrics
    assert metrics["steps"] == 8 and metrics["train_loss_last"] < metrics["train_loss_first"], metrics
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "adapter" / "ref").exists()  # only the trained adapter is published
    written = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert written["method"] == method and "packing" not in written["training"]
    if method != "kto":
        tuned = result.metrics["preference_comparison"]["tuned"]
        assert tuned["pairs"] == 16 and 0 <= tuned["reward_accuracy"] <= 1
    if method == "dpo":  # merged and verified; qlora-kit eval measures the rewards the end of training did
        from qlora_kit.evaluate.stage import run_eval
        from qlora_kit.merge import merge_run

        merged = merge_run(tmp_path / "run")
        assert merged.report["verification"]["passed"], merged.report["verification"]
        report = run_eval(tmp_path / "run").report
        for key in ("reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected"):
            assert report["metrics"]["tuned"][key] == pytest.approx(tuned[key], rel=1e-4, abs=1e-5), key
            assert report["metrics"]["merged"][key] == pytest.approx(tuned[key], rel=1e-2, abs=1e-2), key
        assert "reward_accuracy" not in report["metrics"]["base"]  # the base is the reference: no reward of its own
        assert (tmp_path / "run" / "eval.md").read_text().count("reward_accuracy") == 1


def test_kto_trains_on_pairs_unpaired_with_its_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from qlora_kit import preference
    from qlora_kit.resolve import resolve
    from qlora_kit.tokenizer import load_tokenizer

    rows, held = sum_pairs(16), sum_pairs(8, seed=1)
    weights = {"desirable_weight": 1.25, "undesirable_weight": 0.75}
    raw = preference_recipe(tmp_path, tiny_model_dir, "kto", rows, held, beta=0.1, eval_strategy="steps",
                            eval_steps=4, **weights)  # fmt: skip
    recipe = load_recipe(write_recipe(tmp_path, raw))
    tokenizer, resolved = load_tokenizer(recipe), resolve(recipe)
    data = preference.pref_data.build(recipe, tokenizer)
    model = preference.policy_model(recipe, tokenizer, resolved)
    config = preference.preference_config(recipe, tmp_path / "out", True, resolved)
    trainer = preference.make_trainer(recipe, model, tokenizer, data, config, resolved)
    assert {key: getattr(trainer.args, key) for key in weights} == weights  # KTOConfig's own fields, passed through
    assert len(trainer.train_dataset) == 32 and len(trainer.eval_dataset) == 16  # held-out pairs: rows for the loss
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 16)])  # a pair's chosen and rejected rows
    assert batch["label"].tolist() == [True, False]
    for index, example in enumerate(trainer.train_dataset.select([0, 16])):
        kept = batch["attention_mask"][index].bool()
        ids, mask = batch["input_ids"][index][kept].tolist(), batch["completion_mask"][index][kept].tolist()
        assert ids == example["prompt_ids"] + example["completion_ids"]
        assert mask == [0] * len(example["prompt_ids"]) + [1] * len(example["completion_ids"])  # the answer alone
    assert "eval_loss" in trainer.evaluate()  # and the training run below evaluates every 4 steps
    del trainer, model

    result = preference.train(recipe, tmp_path / "run")
    metrics = result.metrics
    assert metrics["data"]["unpaired_pairs"] == 16 and metrics["data"]["cache"] == "hit"
    assert metrics["steps"] == 8 and metrics["train_loss_last"] < metrics["train_loss_first"], metrics
    assert metrics["preference_comparison"]["tuned"]["pairs"] == 8  # the held-out pairs score the rewards
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert max(t.abs().max().item() for name, t in adapter.items() if "lora_B" in name) > 0  # it moved off the base


# ---------------------------------------------------------------------------------------------------------------
# The reference model


def test_reference_is_the_adapter_disabled_base_with_no_second_model(tmp_path, tiny_model_dir):
    import bitsandbytes as bnb

    from qlora_kit import preference
    from qlora_kit.data import preference as pref_data
    from qlora_kit.resolve import resolve
    from qlora_kit.tokenizer import load_tokenizer

    rows = sum_pairs(8)
    recipe = load_recipe(write_recipe(tmp_path, preference_recipe(tmp_path, tiny_model_dir, "dpo", rows, rows)))
    tokenizer, resolved = load_tokenizer(recipe), resolve(recipe)
    data = pref_data.build(recipe, tokenizer)
    model = preference.policy_model(recipe, tokenizer, resolved)
    before = preference.peak_parameter_bytes(model)
    config = preference.preference_config(recipe, tmp_path / "out", True, resolved)
    trainer = preference.make_trainer(recipe, model, tokenizer, data, config, resolved)
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]
    assert preference.peak_parameter_bytes(trainer.model) == before  # nothing loaded beside the policy
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # one 4-bit base: 2 layers x (q, k, v, o, gate, up, down)
    batch = trainer.data_collator([data.train[i] for i in range(4)])
    with model.disable_adapter():
        expected = trainer.compute_ref_log_probs(trainer.model, batch)
    import torch

    for param in (p for n, p in model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(param, std=0.5)  # the policy moves away; the reference must not
    again = trainer.compute_ref_log_probs(trainer.model, batch)
    for a, b in zip(expected, again, strict=True):
        torch.testing.assert_close(a, b)


def test_reference_of_a_run_started_from_an_adapter_is_that_adapter_frozen(tmp_path, tiny_model_dir):
    import torch

    from qlora_kit import preference
    from qlora_kit.data import preference as pref_data
    from qlora_kit.model import attach_lora, load_base_model
    from qlora_kit.resolve import resolve
    from qlora_kit.tokenizer import load_tokenizer

    rows = sum_pairs(8)
    raw = preference_recipe(tmp_path, tiny_model_dir, "dpo", rows, rows)
    recipe = load_recipe(write_recipe(tmp_path, raw))
    tokenizer, resolved = load_tokenizer(recipe), resolve(recipe)
    start = attach_lora(load_base_model(recipe, tokenizer, resolved), recipe, resolved)
    torch.manual_seed(0)
    for param in (p for n, p in start.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(param, std=0.5)  # an adapter that really changes the model, as an SFT run's does
    start.save_pretrained(tmp_path / "sft-adapter")

    raw["model"]["adapter"] = str(tmp_path / "sft-adapter")
    recipe = load_recipe(write_recipe(tmp_path, raw, "from-adapter.yaml"))
    data = pref_data.build(recipe, tokenizer)
    model = preference.policy_model(recipe, tokenizer, resolved)
    config = preference.preference_config(recipe, tmp_path / "out", True, resolved)
    trainer = preference.make_trainer(recipe, model, tokenizer, data, config, resolved)
    assert trainer.ref_model is None and sorted(model.peft_config) == ["default", "ref"]
    batch = trainer.data_collator([data.train[i] for i in range(4)])
    with torch.no_grad():
        start_logps = trainer.compute_ref_log_probs(trainer.model, batch)  # the reference, before any step
        with model.disable_adapter():
            base_logps = trainer.compute_ref_log_probs(trainer.model, batch)
    assert not torch.allclose(start_logps[0], base_logps[0])  # the reference is not the bare base
    for param in (p for n, p in model.named_parameters() if ".default." in n and p.requires_grad):
        torch.nn.init.normal_(param, std=0.5)  # training moves the trained adapter only
    for a, b in zip(start_logps, trainer.compute_ref_log_probs(trainer.model, batch), strict=True):
        torch.testing.assert_close(a, b)


def test_data_command_shows_prompt_chosen_and_rejected(tmp_path, tiny_model_dir, capsys):
    from qlora_kit.cli import main

    rows = sum_pairs(4)
    path = write_recipe(tmp_path, preference_recipe(tmp_path, tiny_model_dir, "dpo", rows, rows[:2]))
    assert main(["data", path, "--plain", "--examples", "1"]) == 0
    shown = capsys.readouterr().out
    answer, wrong = rows[0]["chosen"][0]["content"], rows[0]["rejected"][0]["content"]
    assert f"chosen: <|im_start|>user\n{rows[0]['prompt'][0]['content']}" in shown
    assert f"[[{answer}<|im_end|>" in shown and f"[[{wrong}<|im_end|>" in shown
    assert "rows: 4" in shown and "eval_rows: 2" in shown


def test_data_command_says_kto_pairs_were_unpaired(tmp_path, tiny_model_dir, capsys):
    from qlora_kit.cli import main

    rows = sum_pairs(4)
    path = write_recipe(tmp_path, preference_recipe(tmp_path, tiny_model_dir, "kto", rows, rows[:2]))
    assert main(["data", path, "--plain", "--examples", "1"]) == 0
    shown = capsys.readouterr().out
    assert "-- example 0 (label True)" in shown and f"[[{rows[0]['chosen'][0]['content']}<|im_end|>" in shown
    assert "rows: 8" in shown and "eval_rows: 2" in shown  # the held-out pairs stay pairs
    words = " ".join(shown.split())  # the terminal wraps long lines
    assert "unpaired: 4 pairs unpaired into 8 KTO rows (chosen: label true, rejected: label false)" in words


# ---------------------------------------------------------------------------------------------------------------
# Exact resume, DDP, and a preference adapter trained on top of an SFT run (real subprocesses, the SFT tests' helpers)


@pytest.fixture(scope="module")
def dpo_recipe(tmp_path_factory, tiny_model_dir) -> Path:
    # 32 pairs in batches of 8: 4 steps an epoch, so 8 steps cross a reshuffle; checkpoints every 2 steps (the SFT
    # resume test's STEPS, whose dropout DPOConfig's disable_dropout turns off in the policy, as trl does).
    folder = tmp_path_factory.mktemp("dpo-runs")
    raw = preference_recipe(folder, tiny_model_dir, "dpo", sum_pairs(32), sum_pairs(8, seed=1), beta=0.1)
    return Path(write_recipe(folder, raw))


@pytest.fixture(scope="module")
def dpo_uninterrupted(dpo_recipe, tmp_path_factory) -> Path:
    from .test_resume import command, run_cli

    run = tmp_path_factory.mktemp("dpo-full") / "run"
    result = run_cli(*command(dpo_recipe, run))
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_dpo_sigkill_then_resume_gives_the_same_adapter(dpo_recipe, dpo_uninterrupted, tmp_path):
    import signal

    from qlora_kit.checkpoints import complete_checkpoints

    from .test_resume import assert_same_adapter, command, losses, run_cli, staging, start_and_signal

    run = tmp_path / "run"
    status, _ = start_and_signal(command(dpo_recipe, run), run, signal.SIGKILL, after_step=2)
    assert status == -signal.SIGKILL and not run.exists()
    saved = complete_checkpoints(staging(run))
    assert saved and saved[-1].name not in ("checkpoint-7", "checkpoint-8"), "killed too late to test resuming"
    resumed = run_cli(*command(dpo_recipe, run, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "dpo" and metrics["steps"] == 8
    assert Path(metrics["launch"]["resumed_from"]).name == saved[-1].name
    assert_same_adapter(dpo_uninterrupted, run)  # bit for bit
    assert losses(run / "checkpoint-8") == losses(dpo_uninterrupted / "checkpoint-8")


def test_dpo_ddp_on_two_cpu_processes_matches_one_process(dpo_recipe, dpo_uninterrupted, tmp_path):
    import torch
    from safetensors.torch import load_file

    from .test_resume import command, losses, run_cli

    # The same global batch of 8 pairs: two processes x 4, against the uninterrupted run's one process x 8.
    run = tmp_path / "ddp"
    ddp = run_cli(*command(dpo_recipe, run, "--accelerate-profile", "ddp", "training.per_device_train_batch_size=4"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["launch"]["processes"] == 2 and metrics["steps"] == 8
    assert {p.name for p in (run / "checkpoint-8").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    got, expected = losses(run / "checkpoint-8"), losses(dpo_uninterrupted / "checkpoint-8")
    assert len(got) == 8 and got[0] != got[-1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    adapter_ddp = load_file(run / "adapter" / "adapter_model.safetensors")
    adapter_one = load_file(dpo_uninterrupted / "adapter" / "adapter_model.safetensors")
    assert adapter_ddp.keys() == adapter_one.keys() and len(adapter_one) == 2 * 7 * 2  # complete: every layer
    for name in adapter_one:
        torch.testing.assert_close(adapter_ddp[name], adapter_one[name], rtol=0, atol=1e-5)


def test_merge_of_a_preference_run_without_held_out_data_verifies_on_training_pairs(tmp_path, tiny_model_dir):
    from qlora_kit.merge import merge_run
    from qlora_kit.preference import train

    raw = preference_recipe(tmp_path, tiny_model_dir, "dpo", sum_pairs(16), sum_pairs(4, seed=1), max_steps=2)
    del raw["data"]["eval"]
    run = tmp_path / "dpo-no-eval"
    train(load_recipe(write_recipe(tmp_path, raw)), run)
    verification = merge_run(run).report["verification"]
    assert verification["passed"], verification
    assert verification["source"].startswith("training")


def test_sft_then_dpo_then_merge_gives_one_model_with_both_updates(tmp_path, tiny_model_dir, arithmetic_rows):
    import torch
    from safetensors.torch import load_file

    from qlora_kit.merge import merge_run
    from qlora_kit.merge.adapter import load_adapter
    from qlora_kit.preference import train
    from qlora_kit.train import train as train_sft

    from .conftest import tiny_recipe

    sft_run, dpo_run = tmp_path / "sft", tmp_path / "dpo"
    train_sft(load_recipe(tiny_recipe(tmp_path, tiny_model_dir, arithmetic_rows, max_steps=4)), sft_run)
    raw = preference_recipe(tmp_path, tiny_model_dir, "dpo", sum_pairs(16), sum_pairs(8, seed=1), max_steps=4)
    raw["model"]["adapter"] = str(sft_run)
    metrics = train(load_recipe(write_recipe(tmp_path, raw, "dpo.yaml")), dpo_run).metrics
    # The run records where it started, by path and by the bytes of the adapter it continued.
    assert metrics["started_from"] == str(sft_run) and "starting adapter" in metrics["reference"]
    assert (
        metrics["started_from_sha256"]
        == hashlib.sha256((sft_run / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()
    )
    assert yaml.safe_load((dpo_run / "recipe.yaml").read_text())["model"]["adapter"] == str(sft_run)

    merged = {}
    for run in (sft_run, dpo_run):
        result = merge_run(run)
        assert result.report["verification"]["passed"], result.report["verification"]  # logits against the adapter
        merged[run] = {k: v for p in sorted((run / "merged").glob("*.safetensors")) for k, v in load_file(p).items()}
    # Both merged onto the same base: the SFT+DPO model differs from the SFT one by exactly the adapters' difference.
    sft, dpo = load_adapter(sft_run, 1.0, "sft"), load_adapter(dpo_run, 1.0, "dpo")
    assert sft.updates.keys() == dpo.updates.keys() and len(dpo.updates) == 2 * 7

    def delta(update) -> torch.Tensor:
        return update.scaling * update.lora_B.float() @ update.lora_A.float()

    moved = 0.0
    for name, update in dpo.updates.items():
        expected = delta(update) - delta(sft.updates[name])
        got = merged[dpo_run][name].float() - merged[sft_run][name].float()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        moved = max(moved, expected.abs().max().item())
    assert moved > 1e-3  # DPO changed the SFT adapter it started from

    # Evaluation names the model the run started from "start", beside each sample's reference answer (chosen).
    from qlora_kit.evaluate.stage import run_eval

    report = run_eval(dpo_run).report
    assert set(report["metrics"]) == {"base", "start", "tuned", "merged"}
    assert "reward_accuracy" not in report["metrics"]["start"] and "reward_accuracy" in report["metrics"]["base"]
    chosen = {pair["chosen"][0]["content"] for pair in sum_pairs(8, seed=1)}
    samples = [json.loads(line) for line in (dpo_run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(row["reference"] in chosen and "start" in row for row in samples)
