"""Dataset loader for the local demo tasks: reads the JSON Lines file next to this one, so no download is needed."""

from pathlib import Path

import datasets


def load_demo_sums(**_):
    """All rows as the test split (lm-eval passes task metadata as keyword arguments; none is needed here)."""
    path = Path(__file__).with_name("demo_sums.jsonl")
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(path), split="train")})
