"""Evaluation for real: a short QLoRA fine-tune of the demo model, then `qlora-kit eval` on base, adapter and merged.

Metric values are checked against hand counts, batched generation against one-at-a-time generation, lm-eval against
a log-likelihood computed here, and every report file against what it claims.
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml

from qlora_kit import model as model_stage
from qlora_kit import tokenizer as tokenizer_rules
from qlora_kit.cli import main
from qlora_kit.evaluate import GenerationSettings, generate
from qlora_kit.evaluate.scoring import load_metrics, score
from qlora_kit.metrics import metric_path
from qlora_kit.recipe import load_recipe
from qlora_kit.train import train

from .conftest import DEMO_DATA, DEMO_MODEL, write_jsonl

DATA = Path(os.environ.get("QLORA_KIT_TEST_DEMO_DATA", DEMO_DATA))  # lets rebuilt demo data be tested uncommitted
TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
LM_TASKS = ["qlora_kit_demo_sums_mc", "qlora_kit_demo_sums_gen"]
EXAMPLES = 32  # held-out examples scored and generated
LIMIT = 5  # lm-eval documents per task


def demo_recipe(tmp: Path, **training) -> Path:
    recipe = {
        "model": {"name_or_path": str(DEMO_MODEL)},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "data": {
            "train": [{"path": str(DATA / "train.jsonl")}],
            "eval": {"path": str(DATA / "eval.jsonl")},
            "max_length": 96,
        },
        "training": {
            "max_steps": 30,
            "per_device_train_batch_size": 16,
            "learning_rate": 3e-3,
            "warmup_steps": 3,
            "logging_steps": 10,
            "report_to": "none",
            "save_strategy": "no",
            "gradient_checkpointing": False,
            **training,
        },
        "eval": {"num_samples": 0, "max_examples": 8, "max_new_tokens": 6, "batch_size": EXAMPLES},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_merged(run: Path) -> Path:
    """A merged model the way a merge stage would leave it: the adapter folded into an unquantized float32 base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(run / "adapter")).merge_and_unload()
    merged.save_pretrained(run / "merged")
    AutoTokenizer.from_pretrained(run / "adapter").save_pretrained(run / "merged")
    return run / "merged"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("eval")
    result = train(load_recipe(demo_recipe(tmp)), tmp / "run")
    write_merged(result.run_dir)
    return result.run_dir


@pytest.fixture(scope="module")
def evaluated(run_dir) -> dict:
    code = main(
        [
            "eval",
            str(run_dir),
            f"eval.max_examples={EXAMPLES}",
            "eval.max_new_tokens=6",
            f"eval.lm_eval.tasks=[{','.join(LM_TASKS)}]",
            f"eval.lm_eval.include_path={TASKS_DIR}",
            "eval.lm_eval.include_defaults=false",
            f"eval.lm_eval.limit={LIMIT}",
        ]
    )
    assert code == 0
    return json.loads((run_dir / "eval.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# The comparison


def test_tuned_beats_base_on_loss_and_answers(evaluated, run_dir):
    base, tuned = evaluated["metrics"]["base"], evaluated["metrics"]["tuned"]
    assert tuned["eval_loss"] < base["eval_loss"] - 1.0
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["eval_loss"]))
    # A 30-step fine-tune mostly teaches the answer format (short answers that stop at the end of turn); the base
    # never answers in that format, so any exact hit is the adapter's. Training is deterministic on CPU.
    assert tuned["exact_match"] > base["exact_match"]
    assert evaluated["deltas"]["tuned"]["exact_match"] == pytest.approx(tuned["exact_match"] - base["exact_match"])
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sum(r["similarity"]["tuned"] for r in rows) > sum(r["similarity"]["base"] for r in rows) + 0.1 * len(rows)
    assert sum(len(r["tuned"]) < len(r["base"]) for r in rows) > 0.8 * len(rows)


def test_merged_model_is_evaluated_on_the_same_work(evaluated, run_dir):
    merged, tuned, base = (evaluated["metrics"][m] for m in ("merged", "tuned", "base"))
    assert set(merged) == set(tuned)
    assert evaluated["models"]["merged"] == str(run_dir / "merged")
    # The merge folds the adapter into unquantized weights, so it is close to the tuned 4-bit model, not equal.
    assert merged["eval_loss"] < base["eval_loss"] - 1.0
    assert abs(merged["eval_loss"] - tuned["eval_loss"]) < 0.5


def test_report_files_hold_what_they_claim(evaluated, run_dir):
    report = evaluated
    assert set(report["metrics"]) == {"base", "tuned", "merged"}
    expected = {"eval_loss", "perplexity", "exact_match", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf"}
    for name, values in report["metrics"].items():
        assert expected <= set(values), name
    assert report["examples"]["loss"] == EXAMPLES and report["examples"]["generation"] == EXAMPLES
    assert report["settings"]["generation"]["max_new_tokens"] == 6
    assert report["settings"]["generation_mode"] == "greedy"
    assert report["settings"]["metrics"] == ["exact_match", "rouge", "bleu", "chrf"]
    assert {"torch", "transformers", "peft", "bitsandbytes", "evaluate", "lm_eval"} <= set(report["versions"])

    table = (run_dir / "eval.md").read_text()
    assert "| metric | base | tuned | merged | Δ tuned | Δ merged |" in table
    loss_row = next(line for line in table.splitlines() if line.startswith("| eval_loss ↓"))
    cells = [c.strip() for c in loss_row.strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(report["metrics"]["base"]["eval_loss"], rel=1e-3)
    assert float(cells[2]) == pytest.approx(report["metrics"]["tuned"]["eval_loss"], rel=1e-3)
    assert cells[4].endswith("✓")  # lower loss is better, and it went down

    import matplotlib.image

    png = run_dir / "eval.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert height > 200 and width > 400


def test_samples_side_by_side_biggest_change_first(evaluated, run_dir):
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == EXAMPLES
    assert sorted(r["index"] for r in rows) == list(range(EXAMPLES))
    for row in rows:
        assert {"prompt", "reference", "base", "tuned", "merged", "exact_match", "similarity", "change"} <= set(row)
        assert row["prompt"].startswith("<|im_start|>") and row["prompt"].endswith("<|im_start|>assistant\n")
        assert row["change"] == pytest.approx(row["similarity"]["tuned"] - row["similarity"]["base"], abs=1e-3)
    changes = [abs(r["change"]) for r in rows]
    assert changes == sorted(changes, reverse=True)
    hits = sum(r["exact_match"]["tuned"] for r in rows)
    assert hits / EXAMPLES == pytest.approx(evaluated["metrics"]["tuned"]["exact_match"])


# ---------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness on the local task


def test_lm_eval_runs_local_tasks_on_every_model(evaluated):
    assert evaluated["examples"]["lm_eval"] == dict.fromkeys(LM_TASKS, LIMIT)
    for name in ("base", "tuned", "merged"):
        values = evaluated["metrics"][name]
        accuracy = values["lm_eval/qlora_kit_demo_sums_mc/acc"]
        matched = values["lm_eval/qlora_kit_demo_sums_gen/exact_match"]
        assert accuracy * LIMIT == pytest.approx(round(accuracy * LIMIT)) and 0 <= accuracy <= 1
        assert matched * LIMIT == pytest.approx(round(matched * LIMIT)) and 0 <= matched <= 1
    assert evaluated["settings"]["lm_eval"]["tasks"] == LM_TASKS


def test_lm_eval_accuracy_matches_loglikelihood_computed_here(evaluated, run_dir):
    """The harness scored the model qlora-kit handed it: recompute the multiple-choice accuracy of the merged model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    docs = [json.loads(line) for line in (TASKS_DIR / "demo_sums.jsonl").read_text().splitlines()][:LIMIT]
    correct = 0
    for doc in docs:
        context = f"{doc['a']} plus {doc['b']} is"
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    assert evaluated["metrics"]["merged"]["lm_eval/qlora_kit_demo_sums_mc/acc"] == pytest.approx(correct / LIMIT)


# ---------------------------------------------------------------------------------------------------------------
# Generation


@pytest.fixture(scope="module")
def adapter_model(run_dir):
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    return model_stage.load_adapter_model(recipe, run_dir / "adapter", tokenizer), tokenizer


def test_batched_generation_equals_one_at_a_time(adapter_model):
    model, tokenizer = adapter_model
    rows = [json.loads(line) for line in (DATA / "eval.jsonl").read_text().splitlines()]
    prompts = [
        tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in rows
    ]
    by_length = {len(tokenizer(p)["input_ids"]): p for p in sorted(set(prompts))}
    lengths = sorted(by_length)
    prompts = [by_length[lengths[0]], by_length[lengths[-1]], by_length[lengths[len(lengths) // 2]]]
    assert len(lengths) >= 3  # three different token lengths: real left padding in the batch
    for context in (model.disable_adapter, nullcontext):  # the base rambles to the limit, the tuned model stops
        with context():
            one = [
                generate(model, tokenizer, [p], settings=GenerationSettings(max_new_tokens=4, batch_size=1))[0]
                for p in prompts
            ]
            batched = generate(model, tokenizer, prompts, settings=GenerationSettings(max_new_tokens=4, batch_size=3))
        assert batched == one
        assert all(one)


def test_sampling_settings_are_seeded_and_differ_from_greedy(adapter_model):
    model, tokenizer = adapter_model
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {n} + 3?"}], tokenize=False, add_generation_prompt=True
        )
        for n in range(8)
    ]
    hot = GenerationSettings(max_new_tokens=3, batch_size=8, do_sample=True, temperature=5.0, seed=1)
    with model.disable_adapter():
        first = generate(model, tokenizer, prompts, settings=hot)
        again = generate(model, tokenizer, prompts, settings=hot)
        greedy = generate(model, tokenizer, prompts, settings=GenerationSettings(max_new_tokens=3, batch_size=8))
    assert first == again
    assert first != greedy


# ---------------------------------------------------------------------------------------------------------------
# Metrics, by hand


def test_builtin_metrics_match_hand_counts():
    import sacrebleu

    metrics = load_metrics(["exact_match", "rouge", "bleu", "chrf"])
    predictions = ["the cat sat on the mat", "hello world"]
    references = ["the cat is on the mat", "hello there"]
    values = score(metrics, predictions, references)
    # ROUGE-1: 5 of 6 unigrams shared (the x2, cat, on, mat) -> F 5/6; "hello" is 1 of 2 -> F 1/2.
    assert values["rouge1"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    # ROUGE-2: bigrams the-cat, on-the, the-mat shared of 5 each -> 3/5; no shared bigram in the second pair.
    assert values["rouge2"] == pytest.approx((3 / 5 + 0) / 2)
    # ROUGE-L: longest common subsequence "the cat on the mat" = 5 -> 5/6; "hello" -> 1/2.
    assert values["rougeL"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert values["exact_match"] == 0.0
    assert values["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)

    # BLEU of "a b c d" against "a b c e": precisions 3/4, 2/3, 1/2 and 0/1, the last smoothed to 1/2
    # (sacrebleu's exp smoothing); brevity penalty 1 -> 100 * (3/4 * 2/3 * 1/2 * 1/2) ** (1/4).
    one = score(metrics, ["a b c d"], ["a b c e"])
    assert one["bleu"] == pytest.approx(100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)
    assert one["bleu"] == pytest.approx(sacrebleu.sentence_bleu("a b c d", ["a b c e"]).score)
    same = score(metrics, ["Paris.", " 42 "], ["paris", "42"])
    assert same["exact_match"] == 1.0 and same["chrf"] < 100  # exact match normalises case and the full stop
    assert score(metrics, ["abc"], ["abc"])["chrf"] == pytest.approx(100.0)


def test_builtin_metrics_load_offline_through_evaluate(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = evaluate.load(str(metric_path("rouge")), keep_in_memory=True)
    assert isinstance(module, evaluate.Metric)
    assert module.compute(predictions=["a b"], references=["a b"])["rouge1"] == pytest.approx(1.0)


def test_user_metrics_function_and_module_path(tmp_path, monkeypatch):
    script = tmp_path / "my_scores.py"
    script.write_text(
        "def length_ratio(predictions, references):\n"
        "    return sum(len(p) for p in predictions) / sum(len(r) for r in references)\n"
        "def two(predictions, references):\n    return {'first': 1, 'second': 2.5, 'note': 'text'}\n"
    )
    copy = tmp_path / "strict_match"
    copy.mkdir()
    (copy / "strict_match.py").write_text(metric_path("exact_match").read_text())
    metrics = load_metrics([f"{script}:length_ratio", f"{script}:two", str(copy)])
    values = score(metrics, ["abcd", "ab"], ["ab", "ab"])
    assert values == {"length_ratio": 6 / 4, "first": 1.0, "second": 2.5, "exact_match": 0.5}
    monkeypatch.syspath_prepend(str(tmp_path))  # an importable module works as well as a file path
    assert score(load_metrics(["my_scores:length_ratio"]), ["a"], ["ab"]) == {"length_ratio": 0.5}


# ---------------------------------------------------------------------------------------------------------------
# Training callback


def test_generation_eval_callback_logs_exact_match(tmp_path):
    from qlora_kit import data as data_stage
    from qlora_kit.evaluate.callback import generation_eval_callback
    from qlora_kit.train import make_trainer

    recipe = load_recipe(
        demo_recipe(tmp_path, max_steps=2, per_device_train_batch_size=4, logging_steps=1),
        ["eval.callback_steps=1", "eval.callback_samples=3", "eval.max_new_tokens=3"],
    )
    tokenizer = tokenizer_rules.load_tokenizer(recipe)
    prepared = data_stage.build_datasets(recipe, tokenizer)
    model = model_stage.attach_lora(model_stage.load_base_model(recipe, tokenizer), recipe)
    trainer = make_trainer(recipe, model, tokenizer, prepared, tmp_path / "out")
    callback = generation_eval_callback(trainer, tokenizer, prepared.eval_rows, recipe)
    assert len(callback.prompts) == 3
    trainer.add_callback(callback)
    trainer.train()
    logged = [(e["step"], e["eval_exact_match"]) for e in trainer.state.log_history if "eval_exact_match" in e]
    assert [step for step, _ in logged] == [1, 2]
    assert all(0.0 <= value <= 1.0 for _, value in logged)
    # Logged beside the trainer's own metrics, without displacing the loss line due at the same steps.
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: exit status 2 and one error line


def _error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_run_directory_without_adapter(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text(demo_recipe(tmp_path).read_text())
    assert "has no adapter" in _error(capsys, ["eval", str(tmp_path)])
    assert "does not exist" in _error(capsys, ["eval", str(tmp_path / "nowhere")])


def test_eval_set_missing_or_empty(run_dir, tmp_path, capsys):
    missing = _error(capsys, ["eval", str(run_dir), "--force", f"data.eval.path={tmp_path / 'gone.jsonl'}"])
    assert "gone.jsonl does not exist" in missing
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "has no rows" in _error(capsys, ["eval", str(run_dir), "--force", f"data.eval.path={empty}"])
    no_answer = write_jsonl(tmp_path / "text.jsonl", [{"text": ""}])
    assert "no example has a token" in _error(capsys, ["eval", str(run_dir), "--force", f"data.eval.path={no_answer}"])
    assert "no held-out data" in _error(capsys, ["eval", str(run_dir), "--force", "data.eval=null"])


def test_unknown_metric_suggests_close_names(run_dir, capsys):
    line = _error(capsys, ["eval", str(run_dir), "--force", "eval.metrics=[exact_match, rogue]"])
    assert "eval.metrics" in line and "unknown metric 'rogue'" in line and "did you mean 'rouge'" in line
    assert "no function" in _error(capsys, ["eval", str(run_dir), "--force", "eval.metrics=[json:nothing_here]"])


def test_lm_eval_missing_or_unknown_task(run_dir, capsys, monkeypatch):
    tasks = [f"eval.lm_eval.include_path={TASKS_DIR}", "eval.lm_eval.include_defaults=false"]
    line = _error(capsys, ["eval", str(run_dir), "--force", "eval.lm_eval.tasks=[qlora_kit_demo_sums_mcq]", *tasks])
    assert "unknown lm-eval task 'qlora_kit_demo_sums_mcq'" in line and "'qlora_kit_demo_sums_mc'" in line
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra looks like
    line = _error(capsys, ["eval", str(run_dir), "--force", "eval.lm_eval.tasks=[qlora_kit_demo_sums_mc]", *tasks])
    assert "pip install 'qlora-kit[lm-eval]'" in line


def test_existing_report_needs_force(evaluated, run_dir, capsys):
    before = (run_dir / "eval.json").read_text()
    assert "pass --force" in _error(capsys, ["eval", str(run_dir)])
    assert (run_dir / "eval.json").read_text() == before
