"""Trainer config: typed loading, precedence, every problem in one error, resolution, resume diffs."""

import pytest
import yaml

from train_student import config as cfg

BASE = ["--student", "S", "--data", "D", "--out", "R"]


def parse(argv):
    return cfg.config_from_args(cfg.build_parser().parse_args(argv))


def test_defaults_follow_method_section_7():
    c = parse([*BASE, "--cache", "C"])
    assert (c.optim.lr, c.optim.weight_decay, c.optim.betas, c.optim.grad_accum) == (5e-5, 0.0, [0.9, 0.999], 4)
    assert (c.optim.warmup_steps, c.optim.lr_floor, c.optim.epochs, c.run.seed) == (0, 0.01, 1, 42)
    assert (c.loss.mid_start, c.loss.mid_end) == (0, -2)
    assert c.loss.mix == dict.fromkeys(["perception", "reasoning", "planning"], [1.0, 1.0, 1.0])  # the study's
    ref = parse([*BASE, "--cache", "C", "--reference"])  # METHOD section 4's (ref) matrix, one flag away
    assert ref.loss.mix == {"perception": [0.8, 0.1, 0.1], "reasoning": [0.1, 0.8, 0.1], "planning": [0.1, 0.1, 0.8]}
    assert c.method.agp and c.method.reweight and c.terms == ["p", "r", "d"]
    assert c.data.caches == {"perception": "C", "reasoning": "C", "planning": "C"}


def test_precedence_yaml_then_flags_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "grad_accum": 8}, "run": {"max_steps": 5},
                                    "data": {"caches": {"perception": "P"}}, "loss": {"signals": ["perception"]}}))
    c = parse([*BASE, "--config", str(path), "--max-steps", "7", "--set", "optim.lr=2e-4",
               "--set", "loss.mix.planning=[0, 1, 1]"])
    assert (c.optim.lr, c.optim.grad_accum, c.run.max_steps) == (2e-4, 8, 7)
    assert c.loss.mix["planning"] == [0.0, 1.0, 1.0] and c.data.caches == {"perception": "P"}


def test_all_problems_reported_in_one_error():
    with pytest.raises(cfg.ConfigError) as err:
        parse(["--data", "D", "--out", "R", "--cache", "C", "--set", "optim.lr=-1", "--set", "optim.grad_accum=0",
               "--set", "loss.mix.planning=[0,0,0]", "--set", "loss.lam_ce=0", "--set", "method.bank_dtype=fp16",
               "--set", "run.max_steps=0"])
    message = str(err.value)
    for expected in ("model.student is empty", "optim.lr=-1.0", "optim.grad_accum=0", "row 'planning' is all zero",
                     "lam_ce=0.0 must be > 0", "bank_dtype='fp16'", "run.max_steps=0"):
        assert expected in message


def test_type_and_unknown_field_errors():
    with pytest.raises(cfg.ConfigError) as err:
        parse([*BASE, "--sft", "--set", "optim.lr=fast", "--set", "optim.warmup=3", "--set", "trainer.x=1",
               "--set", "data.skip_missing=maybe"])
    message = str(err.value)
    assert "optim.lr: expected float, got 'fast'" in message
    assert "unknown field(s) ['warmup']" in message and "unknown section(s) ['trainer']" in message
    assert "data.skip_missing: expected bool" in message


def test_missing_caches_and_cache_spec_forms():
    with pytest.raises(cfg.ConfigError, match=r"no cache for role\(s\) \['reasoning', 'planning'\]"):
        parse([*BASE, "--cache", "perception=P"])
    c = parse([*BASE, "--cache", "perception=P", "--cache", "reasoning,planning=Q"])
    assert c.data.caches == {"perception": "P", "reasoning": "Q", "planning": "Q"}
    c = parse([*BASE, "--cache", "perception=P", "--signals", "perception"])
    assert c.terms == ["p"] and c.data.caches == {"perception": "P"}
    with pytest.raises(cfg.ConfigError, match="ROLE=DIR"):
        parse([*BASE, "--cache", "vision=P"])
    with pytest.raises(cfg.ConfigError, match="two caches"):
        parse([*BASE, "--cache", "perception=P", "--cache", "Q"])


def test_resolution_of_sft_and_reweighting():
    sft = parse([*BASE, "--sft", "--cache", "C"])
    assert sft.terms == [] and not sft.method.agp and not sft.method.reweight and sft.data.caches == {}
    assert parse([*BASE, "--cache", "C", "--no-agp"]).method.reweight is False
    explicit = parse([*BASE, "--cache", "C", "--no-agp", "--set", "method.reweight=true"])
    assert explicit.method.reweight is True and not explicit.method.agp
    assert parse([*BASE, "--cache", "C", "--no-reweight"]).method.agp is True
    with pytest.raises(cfg.ConfigError, match="--online-teacher reads no cache"):
        parse([*BASE, "--cache", "C", "--online-teacher", "T"])


def test_differences_name_fields_and_ignore_run_control():
    a = parse([*BASE, "--cache", "C"]).to_dict()
    b = parse([*BASE, "--cache", "C", "--max-steps", "9", "--set", "optim.lr=1e-3", "--set", "data.num_workers=0",
               "--no-agp"]).to_dict()
    diffs = cfg.differences(a, b)
    assert any(d.startswith("optim.lr (5e-05 -> 0.001)") for d in diffs)
    assert any(d.startswith("method.agp") for d in diffs) and any(d.startswith("method.reweight") for d in diffs)
    assert not any(d.startswith(("run.max_steps", "data.num_workers")) for d in diffs)
    old = parse([*BASE, "--cache", "C", "--set", "data.streams=1"]).to_dict()  # as saved before the field existed
    del old["data"]["streams"], old["run"]["parallel"]
    assert cfg.differences(old, a) == ["data.streams (1 -> 8)"]


def test_saved_config_round_trips(tmp_path):
    c = parse([*BASE, "--cache", "C", "--set", "optim.max_grad_norm=1.0"])
    cfg.save(c, tmp_path / "config.yaml")
    again = cfg.from_dict(cfg.read_yaml(tmp_path / "config.yaml"))
    assert again.to_dict() == c.to_dict()
