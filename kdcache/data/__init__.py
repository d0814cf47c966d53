"""Input data: streaming readers, format detection, and tokenization with the teacher's tokenizer.

Typical use::

    from kdcache.data import open_dataset, tokenize_rows, SkippedRow

    ds = open_dataset("data/*.jsonl.zst")            # or a file, dir, datasets dir, hf:NAME
    for item in tokenize_rows(ds.rows(), tokenizer, max_length=2048, fmt=ds.format,
                              skip_bad_rows=True):
        if isinstance(item, SkippedRow):
            ...  # record item.seq_id / item.source / item.reason in the manifest
        else:
            ...  # a TokenizedExample for the teacher
"""

from kdcache.data.example import TokenizedExample
from kdcache.data.formats import (
    ALPACA,
    FORMATS,
    MESSAGES,
    PROMPT_RESPONSE,
    ROLLOUT,
    TEXT,
    alpaca_prompt,
    detect_format,
    normalize_format,
    reference_text,
)
from kdcache.data.readers import (
    SUPPORTED_SUFFIXES,
    DiskDataset,
    FileDataset,
    HubDataset,
    InputDataset,
    RolloutDataset,
    iter_jsonl,
    iter_jsonl_zst,
    iter_parquet,
    open_dataset,
)
from kdcache.data.tokenize import RowTokenizer, SkippedRow, tokenize_rows

__all__ = [
    "ALPACA",
    "FORMATS",
    "MESSAGES",
    "PROMPT_RESPONSE",
    "ROLLOUT",
    "SUPPORTED_SUFFIXES",
    "TEXT",
    "DiskDataset",
    "FileDataset",
    "HubDataset",
    "InputDataset",
    "RolloutDataset",
    "RowTokenizer",
    "SkippedRow",
    "TokenizedExample",
    "alpaca_prompt",
    "detect_format",
    "iter_jsonl",
    "iter_jsonl_zst",
    "iter_parquet",
    "normalize_format",
    "open_dataset",
    "reference_text",
    "tokenize_rows",
]
