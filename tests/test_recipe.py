"""The recipe schema: every shipped recipe validates, every mistake is named by its dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qlora_kit.errors import UserError
from qlora_kit.recipe import apply_overrides, load_recipe, redact, resolved_dict, validate

from .conftest import REPO

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)

MINIMAL = {"model": {"name_or_path": "some/model"}, "data": {"train": [{"path": "train.jsonl"}]}}


def test_recipes_are_found():
    assert any(p.name == "demo.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert recipe.model.name_or_path


def _error(raw: dict) -> str:
    with pytest.raises(UserError) as info:
        validate(raw)
    return str(info.value)


def test_unknown_key_suggests_closest():
    message = _error({**MINIMAL, "lora": {"rank": 8, "lora_alph": 4}})
    assert "lora.rank: unknown key" in message
    assert "lora.lora_alph: unknown key (did you mean 'lora_alpha'?)" in message


def test_unknown_training_field_suggests_sftconfig_name():
    message = _error({**MINIMAL, "training": {"learnig_rate": 1e-4}})
    assert "training.learnig_rate: not a field of trl's SFTConfig (did you mean 'learning_rate'?)" in message


def test_all_problems_reported_together():
    raw = {**MINIMAL, "lora": {"r": -1}, "training": {"learning_rate": -0.1, "max_steps": "many"}, "extra": 1}
    message = _error(raw)
    assert message.startswith("recipe has 4 problems")
    for key in ("lora.r", "training.learning_rate: must be > 0", "training.max_steps", "extra: unknown key"):
        assert key in message


def test_wrong_types_and_choices_name_the_key():
    message = _error({**MINIMAL, "quantization": {"bnb_4bit_quant_type": "nf5"}, "data": {"train": "x.jsonl"}})
    assert "quantization.bnb_4bit_quant_type" in message and "'nf4'" in message
    assert "data.train" in message


def test_trainer_choices_are_checked_against_the_methods_trl_config(tmp_path, capsys):
    from qlora_kit.cli import main

    message = _error({**MINIMAL, "method": "dpo", "training": {"loss_type": "sigmod"}})
    assert message.startswith(
        "recipe has a problem: training.loss_type: 'sigmod' is not a loss_type of trl's DPOConfig"
    )
    assert "(did you mean 'sigmoid'?)" in message and "apo_zero" in message  # the values trl's own help lists
    listed = _error(
        {**MINIMAL, "method": "dpo", "training": {"loss_type": ["sigmoid", "hing"], "f_divergence_type": "js"}}
    )
    assert "'hing' is not a loss_type of trl's DPOConfig (did you mean 'hinge'?)" in listed
    assert "training.f_divergence_type: 'js' is not a f_divergence_type" in listed
    kto = _error({**MINIMAL, "method": "kto", "training": {"loss_type": "kto2"}})
    assert "loss_type of trl's KTOConfig (did you mean 'kto'?); choose one of kto, apo_zero_unpaired" in kto
    assert "did you mean 'nll'" in _error({**MINIMAL, "training": {"loss_type": "nl"}})
    assert validate({**MINIMAL, "method": "dpo", "training": {"loss_type": "ipo"}}).training["loss_type"] == "ipo"
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "method": "dpo", "training": {"loss_type": "sigmod"}}))
    assert main(["validate", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and "training.loss_type" in error[0], error


def test_numbers_yaml_reads_as_text_reach_the_trainer_as_numbers():
    recipe = load_recipe(REPO / "recipes" / "demo_dpo.yaml", ["training.learning_rate=1e-3", "training.beta=5e-2"])
    assert recipe.training["learning_rate"] == 0.001 and recipe.training["beta"] == 0.05
    assert validate({**MINIMAL, "training": {"learning_rate": "2e-4"}}).training["learning_rate"] == 2e-4


def test_missing_sections():
    message = _error({"model": {}})
    assert "model.name_or_path: required but missing" in message and "data: required but missing" in message


def test_conflicts_are_errors():
    assert "load_in_4bit and load_in_8bit" in _error({**MINIMAL, "quantization": {"load_in_8bit": True}})
    both_eval = {"train": [{"path": "a.jsonl"}], "eval": {"path": "b.jsonl"}, "eval_split": 0.1}
    assert "data.eval and data.eval_split" in _error({**MINIMAL, "data": both_eval})


def test_fields_owned_elsewhere_point_to_their_section():
    assert "training.max_length: set it in data.max_length" in _error({**MINIMAL, "training": {"max_length": 8}})


def test_overrides_parse_yaml_scalars_and_index_lists():
    raw = apply_overrides(
        MINIMAL,
        [
            "training.max_steps=5",
            "lora.r=8",
            "data.train.0.path=my.jsonl",
            "data.train.1.path=more.jsonl",
            "model.trust_remote_code=false",
            "lora.target_modules=[q_proj, v_proj]",
        ],
    )
    recipe = validate(raw)
    assert recipe.training["max_steps"] == 5 and recipe.lora.r == 8
    assert [s.path for s in recipe.data.train] == ["my.jsonl", "more.jsonl"]
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert MINIMAL["data"]["train"][0]["path"] == "train.jsonl"  # the input is not mutated


@pytest.mark.parametrize(
    "override, key",
    [("novalue", "key=value"), ("data.train.5.path=x", "index"), ("model.name_or_path.x=1", "is a value")],
)
def test_bad_overrides(override, key):
    with pytest.raises(UserError, match=key):
        apply_overrides(MINIMAL, [override])


def test_secrets_are_redacted_and_safe_yaml(tmp_path):
    raw = {**MINIMAL, "training": {"hub_token": "hf_secret", "report_to": "none"}}
    resolved = resolved_dict(validate(raw))
    assert resolved["training"]["hub_token"] == "<redacted>"
    assert redact({"wandb_api_key": "x", "n": 1}) == {"wandb_api_key": "<redacted>", "n": 1}
    # Whole words only: a tokenizer path or a token count is not a credential, and must survive into recipe.yaml.
    kept = {"tokenizer_name_or_path": "org/tok", "max_new_tokens": 8, "aws_secret_access_key": "s"}
    assert redact(kept) == {**kept, "aws_secret_access_key": "<redacted>"}
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(unsafe)


def test_default_output_dir_is_named_after_recipe(tmp_path):
    path = tmp_path / "my_run.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert load_recipe(path).output_dir == str(Path("runs") / "my_run")
