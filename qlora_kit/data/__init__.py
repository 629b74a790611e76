"""Data: sources → rows in canonical shape → rendered text + trained spans → input_ids/labels → cached datasets.

``sources`` reads files, directories, globs and hub datasets; ``formats`` checks rows and detects their format;
``tokens`` renders them (masks from the rendered spans, one BOS, a trained end token); ``build`` dedupes, holds out,
mixes, tokenizes and measures; ``cache`` keys the result by its content; ``preview`` shows it in the terminal.
"""

from qlora_kit.data.build import (
    DataStats,
    PreparedData,
    build_datasets,
    encode_rows,
    eval_prompts,
    packing_stats,
    padding_efficiency,
    read_formatted,
)
from qlora_kit.data.formats import detect_format, normalize
from qlora_kit.data.sources import BadRows, Row, RowError, read_source
from qlora_kit.data.tokens import IGNORE_INDEX, adds_bos, chat_spans, prompt_and_reference, render, tokenize

__all__ = [
    "IGNORE_INDEX",
    "BadRows",
    "DataStats",
    "PreparedData",
    "Row",
    "RowError",
    "adds_bos",
    "build_datasets",
    "chat_spans",
    "detect_format",
    "encode_rows",
    "eval_prompts",
    "normalize",
    "packing_stats",
    "padding_efficiency",
    "prompt_and_reference",
    "read_formatted",
    "read_source",
    "render",
    "tokenize",
]
