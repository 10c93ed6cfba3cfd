"""`linearard restore` / `linearard export` end to end on a tiny model, and their one-line errors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from linearard.cli import main
from tiny import byte_tokenizer, save_tiny, write_corpus


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root / "model", "mistral")
    write_corpus(root / "data", docs=3, words=150, suffix=".md")
    return root


def _small(files, output):
    return ["--model", str(files / "model"), "--data", str(files / "data"), "--seq-len", "64", "--max-tokens", "256",
            "--lora-rank", "4", "--lora-alpha", "8", "--output", str(output), "--eval-tokens", "128"]


def test_restore_then_export(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["restore", *_small(files, out), "--target-length", "1024", "--save-every", "2"]) == 0
    printed = capsys.readouterr().out
    assert "rope       yarn x4 (256 -> 1024 tokens)" in printed  # --target-length alone means YaRN
    assert "held-out perplexity" in printed and "restored student" in printed
    assert "done: 4 steps, 256 tokens" in printed
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists()
    assert any((out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "step-00000004" / "config.yaml").exists()

    config = json.loads((out / "model" / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_scaling"]["type"] == "yarn"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert (out / "model" / "adapter" / "adapter_config.json").exists()

    # exporting the final checkpoint again gives the same weights
    assert main(["export", "--checkpoint", str(out), "--output", str(tmp_path / "again")]) == 0
    assert "exported" in capsys.readouterr().out
    first = load_file(out / "model" / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    ids = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, AutoModelForCausalLM.from_pretrained(tmp_path / "again")(input_ids=ids).logits
        )


def test_dry_run_prints_the_plan_and_trains_nothing(files, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*_small(files, out), "--max-tokens", "100k", "--cpt-tokens", "20k", "--cpt-seq-len", "512",
            "--gradient-checkpointing", "--dry-run"]
    assert main(["restore", *args]) == 0
    printed = capsys.readouterr().out
    assert "linear x4 (256 -> 1024 tokens)" in printed
    assert "1. restore  ard" in printed and "2. cpt      cpt" in printed
    assert "tokens     100K in all" in printed
    # the 512-token next-token stage, with its logits, is the heavier one
    assert "peak per process (estimate)" in printed and "activations (cpt)" in printed
    assert "logits chunk" in printed
    assert "3 file(s)" in printed
    assert not out.exists()


def _error(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]  # beside transformers' progress bars
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1]
    return errors[0]


def test_bad_input_is_one_clear_line(files, tmp_path, capsys):
    small = _small(files, tmp_path / "run")

    def with_(flag, value):
        args = list(small)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        return ["restore", *args]

    assert "not found" in _error(with_("--model", str(tmp_path / "nope")), capsys)
    assert "not above the model's native length 256" in _error(with_("--target-length", "128"), capsys)
    assert "above the student's context length 1024" in _error(with_("--seq-len", "2048"), capsys)
    assert "corpus path not found" in _error(with_("--data", str(tmp_path / "missing")), capsys)
    assert "unknown value 'ntk'" in _error(["restore", *small, "--set", "rope_type=ntk"], capsys)
    assert "runs under torchrun" in _error(["restore", *small, "--strategy", "fsdp"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n")
    assert "the corpus" in _error(with_("--data", str(empty)), capsys)
    assert "neither a checkpoint nor a run folder" in _error(
        ["export", "--checkpoint", str(files / "data"), "--output", str(tmp_path / "x")], capsys
    )


def test_unknown_rope_type_flag(files, tmp_path, capsys):
    err = _error(["restore", *_small(files, tmp_path), "--rope-type", "ntk"], capsys)
    assert err == (
        "linearard restore: error: --rope-type: unknown value 'ntk'; "
        "choose one of linear, dynamic, yarn, longrope, llama3, abf"
    )


def test_unsupported_architecture(tmp_path, capsys):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=260, n_positions=256))
    gpt2.save_pretrained(tmp_path / "gpt2")
    byte_tokenizer().save_pretrained(tmp_path / "gpt2")
    err = _error(["restore", "--model", str(tmp_path / "gpt2"), "--dry-run"], capsys)
    assert "unsupported architecture" in err
