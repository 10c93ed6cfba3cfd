"""A cheap estimate of a corpus's size in tokens, for planning a run without tokenizing it all."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from linearard.data.documents import PathLike, corpus_files, iter_records, parse_jsonl_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# a sample spreads over at least this many files, so one odd file does not set the rate
_MIN_FILES_SAMPLED = 8


def estimate_corpus_tokens(
    paths: PathLike | Sequence[PathLike],
    tokenizer: PreTrainedTokenizerBase,
    *,
    sample_bytes: int = 1 << 18,
    text_field: str = "text",
) -> int:
    """Estimate how many tokens a corpus holds by tokenizing a sample of about `sample_bytes`.

    Text and .jsonl files are measured in tokens per file byte (JSON syntax included) times their
    total size, .parquet files in tokens per row times their row count from the file metadata. The
    sample takes the beginning of files in a fixed pseudo-random order. Special tokens, Gutenberg
    boilerplate and the held-out split are not accounted for: expect a few percent of error.

    Args:
        paths: corpus files or folders (see `corpus_files`).
        tokenizer: the Hugging Face tokenizer that will cut the corpus.
        sample_bytes: text to tokenize, in bytes, for each of the two kinds of files.
        text_field: text field of .jsonl records and text column of .parquet files.

    Example:
        >>> tokens = estimate_corpus_tokens(["corpus/"], tokenizer)  # doctest: +SKIP
    """
    files = corpus_files(paths)
    sampled = sorted(files, key=lambda f: hashlib.blake2b(f.name.encode()).digest())
    per_file = max(1, sample_bytes // _MIN_FILES_SAMPLED)
    estimate = 0.0

    sized = [f for f in sampled if f.suffix.lower() != ".parquet"]
    tokens = size = 0
    for file in sized:
        if size >= sample_bytes:
            break
        file_tokens, file_size = _sample_prefix(file, tokenizer, per_file, text_field)
        tokens, size = tokens + file_tokens, size + file_size
    if size:
        estimate += tokens / size * sum(f.stat().st_size for f in sized)

    tables = [f for f in sampled if f.suffix.lower() == ".parquet"]
    if tables:
        import pyarrow.parquet as pq

        tokens = rows = text_bytes = 0
        for file in tables:
            for text in iter_records([file], text_field):
                if text_bytes >= sample_bytes:
                    break
                tokens += _count(tokenizer, text)
                rows += 1
                text_bytes += len(text.encode("utf-8"))
        if rows:
            total_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in tables)
            estimate += tokens / rows * total_rows
    return round(estimate)


def _sample_prefix(
    file: Path, tokenizer: PreTrainedTokenizerBase, limit: int, text_field: str
) -> tuple[int, int]:
    """(tokens, bytes) of about the first `limit` bytes of a text or .jsonl file (whole lines)."""
    with file.open("rb") as handle:
        if file.suffix.lower() == ".jsonl":
            tokens = size = 0
            for line_number, line in enumerate(handle, start=1):
                if size >= limit:
                    break
                size += len(line)
                if line.strip():
                    tokens += _count(tokenizer, parse_jsonl_line(line, text_field, f"{file}:{line_number}"))
            return tokens, size
        prefix = handle.read(limit)
    # a cut through a multi-byte character would read as junk; leave its bytes out of both counts
    text = prefix.decode("utf-8", errors="ignore")
    return _count(tokenizer, text), len(text.encode("utf-8"))


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
