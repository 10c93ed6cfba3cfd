"""What a user sees: the main commands warn of nothing deprecated, print one progress bar per stage and a
closing line, and an exported model carries a model card that says what it is and how to load it."""

import contextlib
import io
import logging
import math
import re
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from linearard.cli import main
from linearard.model_card import model_card
from linearard.models.rope import RopeScaling
from linearard.training.metrics import stage_label
from tiny import save_tiny, write_corpus


@contextlib.contextmanager
def no_deprecation_warning():
    """Deprecation warnings become errors; those transformers logs instead of warning are collected."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()  # transformers logs a message only once per process
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            yield
    finally:
        logger.removeHandler(handler)
    logged = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not logged, logged


def _restore_args(files, output):
    return ["--model", str(files / "base"), "--data", str(files / "data"), "--rope-type", "linear",
            "--rope-factor", "4", "--seq-len", "64", "--max-tokens", "256", "--lora-rank", "4", "--lora-alpha", "8",
            "--eval-tokens", "128", "--output", str(output)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    save_tiny(root / "base", "llama")
    write_corpus(root / "data", docs=3, words=150)
    return root


@pytest.fixture(scope="module")
def restored(files):
    """`linearard restore` with held-out evaluation and export: (run folder, stdout, stderr)."""
    run, out, err = files / "run", io.StringIO(), io.StringIO()
    with no_deprecation_warning(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["restore", *_restore_args(files, run)]) == 0
    return run, out.getvalue(), err.getvalue()


def test_restore_prints_one_bar_per_stage_and_the_rate(restored):
    run, out, err = restored
    done = re.search(r"^done: 4 steps, 256 tokens in \d+ s \((\d+) tokens/s\); output in (.+)$", out, re.M)
    assert done and int(done[1]) > 0 and done[2] == str(run)
    # the bar is labelled by its stage from the start (a log file keeps every redraw as a line)
    assert set(re.findall(r"(?:^|[\r\n])(restore[^\r\n:]*):\s+\d+%", err)) == {"restore"}


def test_export_carries_a_model_card(restored):
    run, out, _ = restored
    card = (run / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| type | linear (Position Interpolation) |" in card and "| factor | 4 |" in card
    assert "| native length | 256 tokens |" in card and "| target length | 1,024 tokens" in card
    assert "| token budget | 256 tokens (256 trained) |" in card and "LoRA rank 4, alpha 8" in card
    # the numbers the run printed (perplexity, KL, top-1 per role), in the card's table
    printed = re.findall(r"^  (teacher|scaled student|restored student).{20,}?\s([\d.]+)\s+([\d.]+)\s+([\d.]+)%$",
                         out, re.M)
    assert len(printed) == 3
    for role, ppl, kl, top1 in printed:
        row = next(line for line in card.splitlines() if line.startswith(f"| {role}"))
        assert row.endswith(f"| {ppl} | {kl} | {float(top1) / 100:.3f} |"), (row, ppl, kl, top1)
    assert (run / "model" / "adapter" / "README.md").exists()  # in place of peft's blank template


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_the_model_cards_loading_recipes_give_the_exported_model(files, restored):
    folder = restored[0] / "model"
    blocks = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert len(blocks) == 2  # plain transformers, then the adapter with peft
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    logits, scope = [], {}
    for code in blocks:  # as a user runs them, one after the other
        code = code.replace("path/to/this/folder", str(folder)).replace("path/to/base", str(files / "base"))
        exec(compile(code, "README.md", "exec"), scope)
        with torch.no_grad():
            logits.append(scope["model"].eval()(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits, logits[0])


def test_dry_run_export_and_eval_warn_of_nothing(files, restored, tmp_path, capsys):
    run = restored[0]
    with no_deprecation_warning():
        assert main(["restore", *_restore_args(files, tmp_path / "plan"), "--dry-run"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "dry run: nothing was trained or written"
        assert not (tmp_path / "plan").exists()

        assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "again")]) == 0
        card = (tmp_path / "again" / "README.md").read_text()
        assert "| token budget | 256 tokens (256 trained) |" in card and "measured nothing on held-out text" in card

        # passkey decodes with a KV cache, whose argument transformers renamed
        assert main(["eval", "--model", str(run / "model"), "--tasks", "passkey", "--lengths", "400",
                     "--samples", "1", "--device", "cpu", "--output", str(tmp_path / "eval")]) == 0
        assert "passkey@400 |" in capsys.readouterr().out


def test_model_card_shows_every_held_out_number_it_is_given():
    scaling = RopeScaling("yarn", 4.0, 8192, 32768)
    heldout = {
        "perplexity": {"teacher": 33.87, "scaled student": 150.2, "restored student": 42.53},
        "kl": {"scaled student": 1.587, "restored student": 0.045},
        "top1": {"scaled student": 0.361, "restored student": 0.878},
        "passkey": {"restored student": math.nan},
    }
    card = model_card("smollm2-135m", scaling, heldout=heldout)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert ("| model | perplexity ↓ | next-token KL to the teacher ↓ | top-1 agreement with the teacher ↑ "
            "| passkey |") in card
    assert "| teacher (the base model, native RoPE) | 33.87 | — | — | — |" in card
    assert "| scaled student, untrained (yarn x4) | 150.20 | 1.5870 | 0.361 | — |" in card
    assert "| restored student (**this model**) | 42.53 | 0.0450 | 0.878 | — |" in card
    assert "## Restore settings" not in card  # no run config given
    assert 'resolve_path("smollm2-135m")' in card  # the embedded base lives in linearard's cache


def test_stage_labels():
    assert stage_label("restore", 0, 1) == "restore"
    assert [stage_label(n, i, 2) for i, n in enumerate(("restore", "cpt"))] == ["restore (1/2)", "cpt (2/2)"]
