"""RestoreConfig: layers of settings (defaults < YAML < --set < flags), parsing, validation, YAML round trip."""

import argparse

import pytest
import yaml

from linearard.config import (
    PAPER_CPT_TOKENS,
    PAPER_TOKENS,
    RestoreConfig,
    build_config,
    field_names,
    load_yaml,
    packaged_configs,
    parse_count,
    parse_options,
    parse_weights,
)
from linearard.errors import UserError
from linearard.training import command


def _parse(argv):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.config_from_args(parser.parse_args(argv))


def test_flags_beat_set_beat_yaml_beat_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seq_len: 512\nlr: 2.0e-4\nlora_rank: 16\nbatch_size: 2\n")
    cfg = _parse(["--config", str(path), "--set", "lr=3e-4", "--set", "lora_rank=32", "--lora-rank", "64"])
    assert cfg.seq_len == 512  # from the file
    assert cfg.batch_size == 2
    assert cfg.lr == 3e-4  # --set over the file
    assert cfg.lora_rank == 64  # the flag over --set
    assert cfg.lora_alpha == RestoreConfig().lora_alpha  # untouched default


def test_rope_settings_travel_together(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rope_type: linear\nrope_factor: 8\n")
    # a target length on the command line replaces the file's type and factor: yarn is resolved later
    cfg = _parse(["--config", str(path), "--target-length", "32768"])
    assert (cfg.rope_type, cfg.rope_factor, cfg.target_length) == (None, None, 32768)
    cfg = _parse(["--config", str(path), "--seq-len", "128"])
    assert (cfg.rope_type, cfg.rope_factor) == ("linear", 8.0)


def test_every_field_is_a_flag_with_help():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    flags = {a.dest: a for a in parser._actions}
    for name in field_names():
        assert name in flags, name
        assert flags[name].help and len(flags[name].help) > 10


def test_typed_flags():
    cfg = _parse(["--max-tokens", "4.25M", "--target-length", "32Ki", "--data", "a.txt", "b/",
                  "--objective", "ard+cpt+logits", "--weights", "ard=1", "cpt=0.5", "--relations", "q=1,k=0.5",
                  "--no-eval",
                  "--objective-options", "ard.kv_norm=query_heads", "logits.temperature=2"])
    assert cfg.max_tokens == 4_250_000 and cfg.target_length == 32768
    assert cfg.data == ["a.txt", "b/"]
    assert cfg.weights == {"ard": 1.0, "cpt": 0.5} and cfg.relations == {"q": 1.0, "k": 0.5}
    assert cfg.eval is False
    assert cfg.objective_options == {"ard": {"kv_norm": "query_heads"}, "logits": {"temperature": 2}}


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["--seq-len", "many"])
    assert exc.value.code == 2
    assert "argument --seq-len: cannot read 'many' as int" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, value",
    [("40000", 40000), ("40_000", 40000), ("40k", 40000), ("4.25M", 4_250_000), ("2Mi", 2 * 2**20), (7, 7), (3.0, 3)],
)
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["1.5", "ten", "4.5x", True, 2.5])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError):
        parse_count(text)


def test_parse_weights_and_options():
    assert parse_weights("q=1, v=0.5") == {"q": 1.0, "v": 0.5}
    assert parse_weights({"q": 2}) == {"q": 2.0}
    with pytest.raises(ValueError):
        parse_weights(["q"])
    assert parse_options({"ard": {"layers": [0, 1]}}) == {"ard": {"layers": [0, 1]}}
    with pytest.raises(ValueError):
        parse_options(["kv_norm=query_heads"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(flags={"seq_len": 0}), "--seq-len must be at least 1"),
        (dict(flags={"lr": -1.0}), "--lr must be a positive number"),
        (dict(flags={"min_lr_ratio": 2.0}), "--min-lr-ratio"),
        (dict(flags={"cpt_tokens": 50_000}), "--cpt-tokens (50000) must be below --max-tokens"),
        (dict(flags={"rope_type": "ntk"}), "unknown value 'ntk'"),
        (dict(flags={"strategy": "zero3"}), "--strategy"),
        (dict(flags={"reduce_dtype": "fp16"}), "--reduce-dtype: unknown value 'fp16'"),
        (dict(flags={"reduce_dtype": "bf16"}), "it needs --strategy ddp or fsdp"),
        (dict(sets=["lora_rnak=4"]), "did you mean 'lora_rank'"),
        (dict(sets=["lr"]), "KEY=VALUE"),
        (dict(sets=["seq_len=abc"]), "cannot read 'abc' as int"),
        (dict(yaml_source="no-such-config"), "neither a file nor a packaged config"),
    ],
)
def test_bad_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError) as err:
        build_config(**kwargs)
    assert message in str(err.value)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seq_len: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        build_config(yaml_source=path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="mapping"):
        build_config(yaml_source=path)
    with pytest.raises(UserError, match="cannot read config"):
        build_config(yaml_source=tmp_path / "missing.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = build_config(
        flags={"model": "m", "rope_type": "yarn", "target_length": 65536, "data": ["x"], "weights": {"ard": 1.0},
               "objective_options": {"ard": {"kv_norm": "query_heads"}}, "gradient_checkpointing": True}
    )
    path = tmp_path / "cfg.yaml"
    cfg.save(path)
    assert yaml.safe_load(path.read_text())["target_length"] == 65536
    assert build_config(yaml_source=path) == cfg


def test_packaged_default_is_the_zero_argument_demo():
    # default.yaml documents the defaults; it must not drift from them
    assert build_config(yaml_source="default") == RestoreConfig()
    assert {p.name for p in packaged_configs()} >= {"default.yaml", "paper.yaml"}


def test_packaged_configs_are_valid():
    for p in packaged_configs():
        build_config(yaml_source=p.name.removesuffix(".yaml"))
    paper = load_yaml("paper")
    assert paper["max_tokens"] == PAPER_TOKENS == 4_250_000  # ARD 2.25M + CPT 2M
    assert paper["cpt_tokens"] == PAPER_CPT_TOKENS
