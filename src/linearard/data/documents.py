"""Text documents from files and folders, streamed in a fixed order.

A *document* is one text file (.txt, .md, .rst), one line of a .jsonl file, or one row of a .parquet
file. Files are read one at a time (parquet in row batches), so a corpus never has to fit in memory.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from linearard.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")

_PARQUET_BATCH_ROWS = 256

# Project Gutenberg wraps every e-text in a licence header and footer. Modern files mark the body with
# "*** START/END OF THE PROJECT GUTENBERG EBOOK ... ***"; 1990s files end their header with the
# "*END*THE SMALL PRINT!" line and close with "End of (the) Project Gutenberg ...".
_GUTENBERG_START = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG E-?(?:BOOK|TEXT)"
    r"|\*END\*THE SMALL PRINT!).*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG E-?(?:BOOK|TEXT)"
    r"|End of (?:the )?Project Gutenberg\b).*$",
    re.IGNORECASE | re.MULTILINE,
)

PathLike = str | Path


def strip_gutenberg_boilerplate(text: str) -> str:
    """Return the body of a Project Gutenberg e-text without its licence header and footer.

    Text without Gutenberg markers comes back unchanged.

    Example:
        >>> strip_gutenberg_boilerplate("licence\\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\\n"
        ...                             "Body.\\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\\nmore")
        'Body.'
    """
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, start.end() if start else 0)
    if start is None and end is None:
        return text
    return text[start.end() if start else 0 : end.start() if end else len(text)].strip()


def corpus_files(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """The corpus files named by `paths`: files as given, folders searched recursively.

    Inside folders, files with other extensions and hidden files or folders (``.git``) are skipped; a
    file named directly must have a supported extension. The result is absolute, without duplicates,
    and sorted, so the corpus order does not depend on how the paths were listed.

    Args:
        paths: files or folders (.txt, .md, .rst, .jsonl, .parquet).

    Raises:
        UserError: a path is missing, a named file has an unsupported extension, or nothing is found.

    Example:
        >>> files = corpus_files(["notes.md", "books/"])  # doctest: +SKIP
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise UserError("no corpus given: name at least one text file or folder")
    found: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            for file in path.rglob("*"):
                hidden = any(part.startswith(".") for part in file.relative_to(path).parts)
                if not hidden and file.suffix.lower() in SUFFIXES and file.is_file():
                    found.add(file.resolve())
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise UserError(
                    f"unsupported corpus file type {path.suffix or '(none)'!r}: {path} "
                    f"(use {', '.join(SUFFIXES)})"
                )
            found.add(path.resolve())
        elif path.exists():
            raise UserError(f"corpus path is neither a file nor a folder: {path}")
        else:
            raise UserError(f"corpus path not found: {path}")
    if not found:
        listed = ", ".join(str(p) for p in paths)
        raise UserError(f"no {', '.join(SUFFIXES)} files found in {listed}")
    return sorted(found, key=Path.as_posix)


def iter_documents(paths: PathLike | Sequence[PathLike], *, text_field: str = "text") -> Iterator[str]:
    """Stream the non-empty documents of a corpus in a deterministic order (sorted files, file order).

    Gutenberg licence boilerplate is stripped from .txt files. The paths are checked at the call; the
    documents are read lazily.

    Args:
        paths: files or folders, see `corpus_files`.
        text_field: the text field of .jsonl records and the text column of .parquet files.

    Raises:
        UserError: bad paths (at the call); an unreadable or malformed file, or a corpus without any
            text (while iterating).

    Example:
        >>> for text in iter_documents(["corpus/"]):  # doctest: +SKIP
        ...     print(len(text))
    """
    files = corpus_files(paths)
    return _non_empty(files, text_field)


def check_text_encoding(files: Sequence[Path]) -> None:
    """Read every text and .jsonl file through once and raise `UserError` at the first one that is not
    UTF-8, so that a run fails before it creates anything rather than when the stream reaches it."""
    for file in files:
        if file.suffix.lower() == ".parquet":
            continue  # parquet strings are UTF-8 by the format
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        try:
            with file.open("rb") as handle:
                for chunk in iter(lambda handle=handle: handle.read(1 << 20), b""):
                    offset += len(chunk)
                    decoder.decode(chunk)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            where = offset - len(err.object) + err.start
            raise UserError(f"{file} is not UTF-8 text (byte {where}): convert it or leave it out") from None
        except OSError as err:
            raise UserError(f"cannot read {file}: {err.strerror or err}") from None


def _non_empty(files: list[Path], text_field: str) -> Iterator[str]:
    count = 0
    for text in iter_records(files, text_field):
        if text.strip():
            count += 1
            yield text
    if count == 0:
        raise UserError(f"the corpus is empty: its {len(files)} file(s) hold no text")


def iter_records(files: Sequence[Path], text_field: str = "text", skip: int = 0) -> Iterator[str]:
    """Every record of `files` in order, empty ones included, after skipping the first `skip`.

    A record is a text file, a non-blank .jsonl line or a .parquet row. Counting empty records too
    keeps record numbers stable, so a reader can skip to a position without reading what it skips:
    a text file is skipped unopened, a parquet row group by its metadata.
    """
    for file in files:
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            reader = _jsonl_records(file, text_field, skip)
        elif suffix == ".parquet":
            reader = _parquet_records(file, text_field, skip)
        elif skip > 0:
            skip -= 1
            continue
        else:
            reader = iter([_read_text(file)])
        for text in reader:
            if skip > 0:
                skip -= 1
            else:
                yield text


def _read_text(file: Path) -> str:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is not UTF-8 text (byte {err.start}): convert it or leave it out") from err
    except OSError as err:
        raise UserError(f"cannot read {file}: {err.strerror or err}") from err
    return strip_gutenberg_boilerplate(text) if file.suffix.lower() == ".txt" else text


def _jsonl_records(file: Path, text_field: str, skip: int) -> Iterator[str]:
    """The records of a .jsonl file; the first `skip` are passed over without parsing (yielded as "")."""
    try:
        with file.open(encoding="utf-8-sig") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if skip > 0:
                    skip -= 1
                    yield ""
                    continue
                yield parse_jsonl_line(line, text_field, f"{file}:{line_number}")
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is not UTF-8 text (byte {err.start})") from err
    except OSError as err:
        raise UserError(f"cannot read {file}: {err.strerror or err}") from err


def parse_jsonl_line(line: str | bytes, text_field: str, where: str) -> str:
    """The `text_field` of one .jsonl line ("" for null); `where` names the line in errors."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not a JSON object ({err.msg})") from err
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{where}: not a JSON object with a {text_field!r} field (each line must hold one)")
    text = record[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} holds {type(text).__name__}, not text")
    return text


def _parquet_records(file: Path, text_field: str, skip: int) -> Iterator[str]:
    """The `text_field` column of a .parquet file, streamed in row batches; skipped rows yield ""."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"cannot read {file} as parquet: {err}") from err
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"{file}: no {text_field!r} column (columns: {', '.join(schema.names)})")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{file}: column {text_field!r} is {column_type}, not text")
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if skip >= rows:
            skip -= rows
            yield from itertools.repeat("", rows)
            continue
        batches = parquet.iter_batches(_PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_field])
        for batch in batches:
            for text in batch.column(0).to_pylist():
                yield text or ""
        skip = 0
