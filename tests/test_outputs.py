"""`restore` and `export` never delete or overwrite what they did not write, and every user mistake is
one line on stderr with exit code 2, before any folder is made."""

import json
import shutil
import struct

import pytest

import linearard.outputs as outputs
from linearard.cli import main
from linearard.outputs import MARKER
from tiny import save_tiny, write_corpus


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, a corpus, and a finished two-step run (with checkpoints) in ``work/run``."""
    root = tmp_path_factory.mktemp("outputs")
    save_tiny(root / "model", "llama")
    write_corpus(root / "data", docs=3, words=80)
    work = root / "work"
    work.mkdir()
    assert main(["restore", *_small(root, work / "run")]) == 0
    return root


def _small(files, output, *extra):
    return ["--model", str(files / "model"), "--data", str(files / "data"), "--seq-len", "32", "--max-tokens", "64",
            "--lora-rank", "4", "--lora-alpha", "8", "--output", str(output), "--no-eval", "--no-export", *extra]


def _error(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]  # beside transformers' progress bars
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err
    return errors[0]


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_export_never_deletes_what_it_did_not_write(files, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(files / "work", work)
    (work / "notes.txt").write_text("mine")
    before = _tree(work)
    run = work / "run"
    step = run / "checkpoints" / "step-00000002"

    def export(output, *extra):
        return ["export", "--checkpoint", str(run), "--output", str(output), *extra]

    monkeypatch.chdir(work)
    assert "--output . holds the input" in _error(export(".", "--overwrite"), capsys)
    assert "holds the input" in _error(export(work), capsys)  # the run's parent
    assert "holds the input" in _error(export(run, "--overwrite"), capsys)  # the run itself
    assert "lies inside the input" in _error(
        ["export", "--checkpoint", str(step), "--output", str(step / "merged")], capsys
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    assert "is not empty and was not written by linearard export" in _error(export(other, "--overwrite"), capsys)
    assert (other / "thesis.tex").read_text() == "years of work"
    another_run = tmp_path / "another-run"
    shutil.copytree(run, another_run)
    assert "holds the output of linearard restore" in _error(export(another_run, "--overwrite"), capsys)
    (tmp_path / "file").write_text("x")
    assert "is a file; give a folder" in _error(export(tmp_path / "file"), capsys)
    assert _tree(work) == before

    merged = run / "merged"  # inside the run folder, beside the checkpoints: fine
    assert main(export(merged)) == 0
    assert json.loads((merged / MARKER).read_text())["command"] == "export"
    assert "holds an earlier export; pass --overwrite" in _error(export(merged), capsys)
    assert main(export(merged, "--overwrite")) == 0


def test_restore_never_writes_over_its_input_or_foreign_folders(files, tmp_path, capsys):
    home = tmp_path / "home"
    shutil.copytree(files / "model", home / "model")
    before = _tree(home)
    err = _error(["restore", *_small(files, home), "--model", str(home / "model")], capsys)
    assert f"--output {home} holds the input {home / 'model'}" in err
    err = _error(["restore", *_small(files, home / "model" / "run"), "--model", str(home / "model")], capsys)
    assert "lies inside the input" in err
    assert _tree(home) == before

    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "a.pdf").write_text("x")
    assert "not empty and was not written by linearard restore" in _error(
        ["restore", *_small(files, tmp_path / "papers"), "--overwrite"], capsys
    )
    assert "is a file; give a folder" in _error(["restore", *_small(files, tmp_path / "papers" / "a.pdf")], capsys)
    assert _tree(tmp_path / "papers") == ["a.pdf"]


def test_restore_starts_over_only_with_overwrite_and_only_its_own_files(files, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(files / "work" / "run", run)
    err = _error(["restore", *_small(files, run)], capsys)
    assert "already holds a run (checkpoints up to step-00000002); pass --resume to continue it, --overwrite" in err
    assert "give one" in _error(["restore", *_small(files, run), "--resume", "--overwrite"], capsys)
    (run / "notes").mkdir()
    (run / "notes" / "keep.txt").write_text("x")
    assert "holds 'notes', which linearard restore did not write" in _error(
        ["restore", *_small(files, run), "--overwrite"], capsys
    )
    assert (run / "notes" / "keep.txt").exists()
    shutil.rmtree(run / "notes")
    (run / "checkpoints" / "step-00000002" / "trainer.json").write_text("{}")  # marks the old checkpoint
    (run / "checkpoints" / "step-00000001").mkdir()
    assert main(["restore", *_small(files, run), "--overwrite"]) == 0
    assert json.loads((run / "checkpoints" / "step-00000002" / "trainer.json").read_text())["step"] == 2
    assert not (run / "checkpoints" / "step-00000001").exists()


def test_an_unwritable_output_is_one_line_before_anything_happens(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    monkeypatch.setattr(outputs, "_read_only", lambda path: True)
    err = _error(["restore", *_small(files, tmp_path / "a" / "b")], capsys)
    assert err == f"linearard restore: error: cannot write --output {tmp_path / 'a' / 'b'}: the file system is " \
                  f"read-only ({tmp_path})"
    assert not (tmp_path / "a").exists()


def test_bad_input_is_one_line_before_any_folder_is_made(files, tmp_path, capsys):
    out = tmp_path / "run"
    small = _small(files, out)

    def restore(*extra, dry_run=False):
        return ["restore", *small, *extra, *(["--dry-run"] if dry_run else [])]

    assert "--set lr={: '{' is not a valid value" in _error(restore("--set", "lr={"), capsys)
    assert "--seq-len must be at least 1, got -1" in _error(restore("--seq-len", "-1"), capsys)
    err = _error(restore("--rope-type", "linear", "--rope-factor", "4", "--target-length", "2048"), capsys)
    assert "--target-length 2048 is beyond what linear x4 reaches from the model's native 256 tokens (1024)" in err
    err = _error(restore("--seq-len", "512", "--target-length", "1024"), capsys)
    assert "--seq-len 512 is above the model's native context of 256 tokens" in err
    err = _error(["restore", *small, "--model", f"{files / 'model'}@linear:abc", "--dry-run"], capsys)
    assert "the RoPE factor 'abc' is not a number" in err
    assert "unknown RoPE type 'ntk'" in _error(["eval", "--model", f"{files / 'model'}@ntk:4"], capsys)

    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "a.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 40)
    for dry_run in (False, True):
        err = _error(restore("--data", str(latin), dry_run=dry_run), capsys)
        assert f"{latin / 'a.txt'} is not UTF-8 text (byte 3)" in err
    records = tmp_path / "records"
    records.mkdir()
    (records / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    err = _error(restore("--data", str(records)), capsys)
    assert "not a JSON object with a 'text' field" in err and "text_field" not in err
    assert not out.exists()

    # documents too short for one block show only once tokenized, in the run (a rerun may reuse its folder)
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("tiny")
    err = _error(restore("--data", str(short)), capsys)
    assert "lower --seq-len" in err and "min_tokens" not in err and "pack" not in err
    assert "lower --seq-len" in _error(restore("--data", str(short)), capsys)


def test_a_truncated_gguf_is_one_line(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    # a GGUF header (magic, version 3, 1 tensor, 5 metadata entries) cut off inside the first key
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + struct.pack("<Q", 24) + b"general.arch")
    err = _error(["restore", "--model", str(gguf), "--dry-run"], capsys)
    assert f"cannot read the GGUF file {gguf}: it is truncated or damaged" in err
