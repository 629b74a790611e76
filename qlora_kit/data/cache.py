"""A content-addressed cache of processed datasets.

The key is a SHA-256 over everything that decides the result: the bytes of every data file (or a hub dataset's id,
config, split, revision and datasets fingerprint), the tokenizer (its tokenizer.json, special tokens and chat
template), the data options (formats, column mappings, mixing, max_length, truncation policy, ...), the library
versions that tokenize, and this pipeline's own version. An entry is written to a temporary folder and renamed into
place when complete, so a folder under the cache root is always whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from qlora_kit.data.sources import Row, load_hub, local_files
from qlora_kit.recipe import DataSection, DataSource

# Bump whenever a change to the pipeline changes what it produces from the same inputs.
PIPELINE_VERSION = "qlora-kit-data-3"  # 3: tools, reasoning, truncation policies
# Options that change how (or whether) the result is stored, not the result itself.
NOT_IN_KEY = {"cache", "cache_dir", "num_proc"}


def cache_root(section: DataSection) -> Path:
    """The recipe's data.cache_dir, else $QLORA_KIT_CACHE/data, else ~/.cache/qlora-kit/data."""
    if section.cache_dir:
        return Path(section.cache_dir).expanduser()
    base = os.environ.get("QLORA_KIT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "qlora-kit") / "data"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(source: DataSource) -> dict[str, Any]:
    """What a source's content is: the files' names and bytes, or the hub dataset's identity and fingerprint."""
    files = local_files(source.path)
    if files is None:
        dataset = load_hub(source)
        return {
            "hub": source.path,
            "name": source.name,
            "split": source.split,
            "revision": source.revision,
            "fingerprint": getattr(dataset, "_fingerprint", None),
        }
    root = Path(source.path).expanduser()
    base = root if root.is_dir() else None
    # The path as written is part of the key too: the cached statistics and error locations name it.
    return {
        "path": source.path,
        "files": [[str(p.relative_to(base)) if base else p.name, file_digest(p)] for p in files],
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary and rules, special tokens, chat template and what it adds around text."""
    from qlora_kit.data.tokens import TokenRules

    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    rules = TokenRules.of(tokenizer)
    extra = {
        "special": tokenizer.special_tokens_map,
        "template": tokenizer.chat_template,
        "rules": [rules.bos, rules.adds_bos, rules.eos, sorted(rules.stops)],
        "class": type(tokenizer).__name__,
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(section: DataSection, tokenizer, extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The cache key and the description it hashes (kept beside the entry, to see why two runs differ); ``extra``
    holds what else decides the result (the preference pipeline's version and method)."""
    from importlib.metadata import version

    options = section.model_dump(mode="json", exclude=NOT_IN_KEY)
    for source in [*options["train"], *([options["eval"]] if options["eval"] else [])]:
        source.pop("path")  # the content below decides, not where it lies
    description = {
        "pipeline": PIPELINE_VERSION,
        "versions": {name: version(name) for name in ("tokenizers", "transformers", "jinja2")},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "train": [source_fingerprint(source) for source in section.train],
        "eval": source_fingerprint(section.eval) if section.eval else None,
        "options": options,
    }
    if extra:
        description["extra"] = extra
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return key, description


def load(entry: Path) -> dict[str, Any] | None:
    """A complete cache entry's datasets, held-out rows and statistics, or None when there is none."""
    import datasets

    if not (entry / "stats.json").is_file():
        return None
    stats = json.loads((entry / "stats.json").read_text())
    rows = [Row(**item) for item in json.loads((entry / "eval_rows.json").read_text())]
    evaluation = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    return {
        "train": datasets.load_from_disk(str(entry / "train")),
        "eval": evaluation,
        "eval_rows": rows,
        "stats": stats,
    }


def save(entry: Path, train, evaluation, eval_rows: list[Row], stats: dict[str, Any], description: dict) -> None:
    """Write an entry to a temporary folder beside it, then rename it into place (a racing writer's copy wins)."""
    from qlora_kit.rundir import unique_staging

    staging = unique_staging(entry)
    try:
        train.save_to_disk(str(staging / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(staging / "eval"))
        rows = [{"data": r.data, "where": r.where, "fmt": r.fmt} for r in eval_rows]
        (staging / "eval_rows.json").write_text(json.dumps(rows))
        (staging / "key.json").write_text(json.dumps(description, indent=1, sort_keys=True))
        (staging / "stats.json").write_text(json.dumps(stats))  # written last: its presence marks a whole entry
        staging.rename(entry)
    except OSError:
        if not entry.is_dir():
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def check_writable(section: DataSection) -> None:
    """The cache folder can be written (checked before any work, so a long preparation is never lost at the end)."""
    from qlora_kit.rundir import check_writable as check_folder

    if section.cache:
        check_folder(cache_root(section) / "entry", flag="data.cache_dir")
