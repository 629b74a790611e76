"""The recipe reference is generated from the schema, and the committed page matches it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from qlora_kit import docs, recipe

from .conftest import REPO

REFERENCE = REPO / "docs" / "recipe-reference.md"


def _sections(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for field in model.model_fields.values():
        inner, _ = docs._section_models(field.annotation)
        if inner is not None and inner not in found:
            found += [m for m in _sections(inner) if m not in found]
    return found


def test_committed_reference_is_current():
    assert REFERENCE.read_text() == docs.recipe_reference(), (
        f"docs/recipe-reference.md is out of date with the recipe schema: regenerate it with `{docs.COMMAND}`"
    )


def test_every_recipe_key_is_described_and_listed():
    text = docs.recipe_reference()
    for model in _sections(recipe.Recipe):
        for name, field in model.model_fields.items():
            assert f"| `{name}` |" in text, name
            if docs._section_models(field.annotation)[0] is None:
                assert field.description, f"{model.__name__}.{name} needs Field(description=...)"


def test_generator_walks_any_schema(capsys):
    class Source(BaseModel):
        path: str = Field(description="Where | it is.")
        kind: Literal["a", "b"] = Field("a", description="Which kind.")

    class Inner(BaseModel):
        sources: list[Source] = Field(description="Sources.")
        held_out: Source | None = Field(None, description="One more.")
        ratio: float | None = Field(None, description="A ratio.")

    class Top(BaseModel):
        inner: Inner
        flag: bool = Field(True, description="A flag.")

    lines = docs.walk(Top, "", {})
    text = "\n".join(lines)
    assert "## `inner.sources[]`" in text and "The same keys as `inner.sources[]`." in text
    assert "| `kind` | one of: `a`, `b` | `a` | Which kind. |" in text
    assert "| `path` | str | required | Where \\| it is. |" in text
    assert "| `ratio` | float or null | null | A ratio. |" in text
    assert "| `flag` | bool | `true` | A flag. |" in text
    assert "| `inner` | section | required | The `inner` section, below. |" in text

    assert docs.main() == 0
    assert capsys.readouterr().out == docs.recipe_reference()


def test_planner_worked_example_matches_the_planner():
    """Each line of plan.py's worked example (and its total) is what the planner computes for that recipe."""
    import re

    from qlora_kit import plan
    from qlora_kit.recipe import validate

    recipe = validate(
        {
            "model": {"name_or_path": "arch:llama-3.1-8b"},
            "data": {"train": [{"path": "x.jsonl"}], "max_length": 2048},
            "training": {"per_device_train_batch_size": 1},
        }
    )
    result = plan.plan_recipe(recipe, machine=plan.ASSUMED_GPU)
    stated = dict(re.findall(r"^\s{4}(\w+)\s.*?= (\d+\.\d+) GB", plan.__doc__, re.M | re.S))
    assert set(stated) == {*result.parts, "total"}
    for name, gigabytes in stated.items():
        value = result.total if name == "total" else result.parts[name]
        assert abs(value / 1e9 - float(gigabytes)) < 0.006, name


def test_benchmarking_doc_lists_every_shipped_architecture():
    from qlora_kit.plan import shipped_architectures

    text = (REPO / "docs" / "benchmarking.md").read_text()
    assert [name for name in shipped_architectures() if f"`{name}`" not in text] == []
