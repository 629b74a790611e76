"""The recipe reference, generated from the recipe schema so that it cannot drift from it.

Every section and key is read from the pydantic models in ``qlora_kit.recipe``: names, types, defaults and the
``Field(description=...)`` text. Regenerate the committed page with::

    python -m qlora_kit.docs > docs/recipe-reference.md
"""

from __future__ import annotations

import sys
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from qlora_kit.recipe import (
    METHOD_CONFIGS,
    METHOD_FIXED,
    OWNED_PREFERENCE_FIELDS,
    OWNED_TRAINING_FIELDS,
    PREFERENCE_DEFAULTS,
    PREFERENCE_DROPPED,
    TRAINING_DEFAULTS,
    Recipe,
    field_choices,
)

COMMAND = "python -m qlora_kit.docs > docs/recipe-reference.md"

HEADER = f"""# Recipe reference

Every key a recipe can hold, with its type, default and meaning. This page is generated from the recipe schema
(`qlora_kit/recipe.py`) by running

    {COMMAND}

and a test fails when it is out of date: edit the schema's field descriptions, not this page.

A recipe is a YAML mapping of the sections below. Unknown keys are errors (with the closest valid name suggested),
and every problem is reported at once under its dotted key. Any key can be overridden on the command line as
`dotted.key=value`, for example `qlora-kit train recipe.yaml lora.r=8 data.train.0.path=other.jsonl`.
"""


def _section_models(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic section inside an annotation, and whether it is a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args:
        inner, _ = _section_models(args[0])
        return inner, inner is not None
    for arg in args if origin in (typing.Union, types.UnionType) else ():
        inner, is_list = _section_models(arg)
        if inner is not None:
            return inner, is_list
    return None, False


def type_name(annotation: Any) -> str:
    """A reader's name for a type: `int`, `one of: nf4, fp4`, `list of str`, `str or null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of: " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "see below" if isinstance(value, BaseModel) else f"`{_yaml_value(value)}`"
    if field.default is PydanticUndefined:
        return "required"
    value = field.default
    if value is None:
        return "null"
    return f"`{_yaml_value(value)}`"


def _yaml_value(value: Any) -> str:
    """A value as it is written in a recipe (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section_table(model: type[BaseModel], path: str) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        description = field.description or ""
        inner, is_list = _section_models(field.annotation)
        if inner is not None:
            child = (f"{path}.{name}" if path else name) + ("[]" if is_list else "")
            description = (description + " " if description else "") + f"The `{child}` section, below."
        cells = [f"`{name}`", type_name(field.annotation), default_text(field), description]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def walk(model: type[BaseModel], path: str, seen: dict[type, str]) -> list[str]:
    """One heading and table per section, depth first in schema order; a model seen before is referred to."""
    title = f"`{path}`" if path else "Top level"
    if model in seen:
        return [f"## {title}", "", f"The same keys as `{seen[model]}`.", ""]
    seen[model] = path or "top level"
    lines = [f"## {title}", "", *section_table(model, path), ""]
    for name, field in model.model_fields.items():
        inner, is_list = _section_models(field.annotation)
        if inner is not None:
            child = f"{path}.{name}" if path else name
            lines += walk(inner, f"{child}[]" if is_list else child, seen)
    return lines


def training_section() -> list[str]:
    """The training mapping takes SFTConfig's own fields; list the defaults qlora-kit changes and the owned keys."""
    lines = [
        "## `training`",
        "",
        "Any field of trl's `SFTConfig` (and so of transformers' `TrainingArguments`), checked against the installed",
        "trl's field names and types. qlora-kit starts from these defaults, which suit QLoRA better than the",
        "full-fine-tuning ones; a recipe can set each of them:",
        "",
        "| key | qlora-kit default |",
        "|---|---|",
    ]
    lines += [f"| `{key}` | `{_yaml_value(value)}` |" for key, value in TRAINING_DEFAULTS.items()]
    lines += ["", "These fields are set elsewhere in the recipe, and are errors under `training`:", ""]
    lines += ["| key | set it in |", "|---|---|"]
    lines += [f"| `{key}` | {_cell(where)} |" for key, where in OWNED_TRAINING_FIELDS.items()]
    return lines + ["", *preference_training(), ""]


def preference_training() -> list[str]:
    """What changes under ``training`` for a preference method: its trl config, defaults, owned keys, choices."""
    configs = ", ".join(f"`{name}` ({method})" for method, (_, name) in METHOD_CONFIGS.items() if method != "sft")
    dropped = ", ".join(f"`{key}`" for key in PREFERENCE_DROPPED)
    changed = ", ".join(f"`{key}: {_yaml_value(value)}`" for key, value in PREFERENCE_DEFAULTS.items())
    lines = [
        "### `training` for preference methods",
        "",
        "With a preference `method`, `training` takes the fields of that method's trl config instead:",
        f"{configs}. The defaults above apply except {dropped} (not a preference field) and {changed}.",
        "These keys are also set elsewhere:",
        "",
        "| key | set it in |",
        "|---|---|",
    ]
    lines += [f"| `{key}` | {_cell(where)} |" for key, where in OWNED_PREFERENCE_FIELDS.items()]
    lines += ["", "A method fixes these values (a different one is an error):", ""]
    lines += [
        f"- {method}: " + ", ".join(f"`{k}: {_yaml_value(v)}`" for k, v in fixed.items())
        for method, fixed in METHOD_FIXED.items()
    ]
    lines += [
        "",
        "The loss choices each config accepts, read from the installed trl (every choice field is checked, a",
        "typo gets the closest value suggested):",
        "",
    ]
    lines += ["| method | key | values |", "|---|---|---|"]
    for method in METHOD_CONFIGS:
        for key, values in field_choices(method).items():
            if "loss" in key or "divergence" in key:
                lines.append(f"| {method} | `{key}` | {', '.join(f'`{v}`' for v in values)} |")
    return lines


def recipe_reference() -> str:
    """The whole reference page as Markdown."""
    lines = [HEADER, *walk(Recipe, "", {}), *training_section()]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(recipe_reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
