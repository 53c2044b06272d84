"""Training configuration: defaults, YAML round trip, type and key errors, CLI precedence."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import typing

import pytest

from yoda.commands import train as train_command
from yoda.config import (
    NON_MATH_FIELDS,
    SECTIONS,
    TrainConfig,
    apply_overrides,
    config_diff,
    config_from_dict,
    config_hash,
    config_to_dict,
    config_yaml,
    load_config,
    parse_assignment,
    parse_device,
    save_config,
    validate,
)
from yoda.errors import ConfigError


def _complete(**overrides) -> TrainConfig:
    values = {
        "data.manifest": "cohort/manifest.csv",
        "data.sources": ["t1w", "t2w"],
        "data.target": "flair",
        "run.out": "runs/a",
    }
    values.update(overrides)
    return apply_overrides(TrainConfig(), values)


def test_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.model.preset, c.model.n_slices, c.model.prediction) == ("small", 5, "v")
    assert (c.model.schedule, c.model.T) == ("linear", 1000)
    assert (c.optim.lr, c.optim.batch_size, c.optim.ema_decay) == (1e-4, 96, 0.999)
    assert c.optim.ema_warmup is True
    assert c.data.samples_per_volume == 20000
    assert c.data.views == ("axial", "coronal", "sagittal")
    assert c.data.normalization == "tissue" and c.data.mask_weighting is False
    assert c.data.mask_weight_outside == 0.01
    # departures are off by default
    assert c.optim.lr_final is None and c.optim.high_t_share == 0.0 and c.optim.grad_clip is None


def test_every_field_is_documented():
    import inspect

    import yoda.config as module

    source = inspect.getsource(module)
    for cls in SECTIONS.values():
        body = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            line = next(i for i, s in enumerate(body.splitlines()) if s.strip().startswith(f.name))
            assert body.splitlines()[line - 1].strip().startswith("#:"), f"{cls.__name__}.{f.name}"
    assert "departure" in source


def test_yaml_round_trip(tmp_path):
    config = _complete(
        **{
            "model.preset": "tiny",
            "model.T": 1,
            "model.prediction": "x0",
            "optim.lr_final": 1e-6,
            "optim.micro_batch": 8,
            "data.views": ["axial"],
            "run.steps": 123,
            "run.notes": "a note: with colon",
        }
    )
    path = save_config(config, tmp_path / "config.yaml")
    assert load_config(path) == config
    assert config_from_dict(config_to_dict(config)) == config
    assert path.read_text().startswith("# yoda training configuration")
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves nothing behind


def test_partial_yaml_keeps_defaults_and_reads_exponent_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\nmodel:\n  preset: tiny\n")
    config = load_config(path)
    assert config.optim.lr == 3e-4  # YAML reads 3e-4 (no dot) as a string
    assert config.model.preset == "tiny"
    assert config.model.T == 1000 and config.optim.batch_size == 96


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim:\n  lrr: 0.1\n", "unknown config key 'optim.lrr'"),
        ("training:\n  lr: 0.1\n", "unknown config key 'training'"),
        ("optim:\n  batch_size: many\n", "'optim.batch_size': expected int"),
        ("optim:\n  batch_size: 9.5\n", "'optim.batch_size'"),
        ("optim:\n  ema_warmup: 1\n", "'optim.ema_warmup': expected bool"),
        ("data:\n  sources: t1w\n", "'data.sources': expected list of str"),
        ("data:\n  sources: [t1w, 3]\n", "'data.sources'"),
        ("run:\n  steps: true\n", "'run.steps'"),
        ("optim: 3\n", "section 'optim' must be a mapping"),
        ("- a\n- b\n", "must be a mapping"),
        ("optim: [unclosed\n", "not valid YAML"),
    ],
)
def test_yaml_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_override_type_checks_and_unknown_keys():
    with pytest.raises(ConfigError, match="unknown config key 'optim.momentum'"):
        apply_overrides(TrainConfig(), {"optim.momentum": 0.9})
    with pytest.raises(ConfigError, match="unknown config key 'lr'; did you mean 'optim.lr'"):
        apply_overrides(TrainConfig(), {"lr": 1e-3})
    with pytest.raises(ConfigError, match="'optim.lrr'; did you mean 'optim.lr'"):
        apply_overrides(TrainConfig(), {"optim.lrr": 1e-3})
    with pytest.raises(ConfigError, match="'optim.steps'; did you mean 'run.steps'"):
        apply_overrides(TrainConfig(), {"optim.steps": 10})
    with pytest.raises(ConfigError, match="'model.T'"):
        apply_overrides(TrainConfig(), {"model.T": "many"})
    assert parse_assignment("optim.lr=2e-4") == ("optim.lr", "2e-4")
    assert parse_assignment("data.views=[axial, coronal]") == ("data.views", ["axial", "coronal"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("optim.lr")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.n_slices": 4}, "odd"),
        ({"model.preset": "huge"}, "model.preset must be one of"),
        ({"model.prediction": "score"}, "model.prediction"),
        ({"model.schedule": "sigmoid"}, "model.schedule"),
        ({"model.T": 0}, "model.T must be >= 1"),
        ({"model.T": 100_001}, "model.T must be at most 100000"),
        ({"model.T": 1, "model.prediction": "eps"}, "T=1"),
        ({"data.views": ["axial", "axial"]}, "duplicates"),
        ({"data.views": ["oblique"]}, "data.views"),
        ({"data.normalization": "zscore"}, "data.normalization"),
        ({"data.target": "t1w"}, "also a source"),
        ({"data.sources": ["T1w"]}, "lower-case"),
        ({"optim.ema_decay": 1.0}, "ema_decay"),
        ({"optim.high_t_share": 1.5}, "high_t_share"),
        ({"model.init": "/nonexistent/model"}, "not a model directory"),
        ({"optim.lr": 0.0}, "optim.lr"),
        ({"optim.lr": "inf"}, "optim.lr must be a finite number"),
        ({"optim.lr": float("nan")}, "optim.lr must be a finite number"),
        ({"optim.lr_final": "inf"}, "optim.lr_final must be a finite number"),
        ({"optim.lr_final": float("-inf")}, "optim.lr_final must be a finite number"),
        ({"run.seed": -1}, r"run\.seed must be an integer from 0 to 2\*\*64 - 1; got -1"),
        ({"run.seed": 2**64}, r"run\.seed must be an integer from 0 to 2\*\*64 - 1"),
        ({"run.device": "gpu"}, "run.device"),
        ({"run.device": "cuda:x"}, "run.device"),
        ({"run.precision": "fp8"}, "run.precision"),
        ({"run.log_every": 0}, "run.log_every"),
    ],
)
def test_validation_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(_complete(**overrides))


def test_required_fields():
    with pytest.raises(ConfigError, match="data.manifest is required"):
        validate(TrainConfig())
    validate(_complete())  # complete config passes


def test_extreme_valid_seed_and_learning_rates_pass():
    validate(_complete(**{"run.seed": 2**64 - 1, "optim.lr": 1e3, "optim.lr_final": 0.0}))


def test_parse_device():
    assert parse_device("auto") == ("auto", None)
    assert parse_device("cpu") == ("cpu", None)
    assert parse_device("cuda") == ("cuda", None)
    assert parse_device("cuda:3") == ("cuda", 3)
    for bad in ("cuda:", "cuda:-1", "mps", "CPU"):
        with pytest.raises(ConfigError):
            parse_device(bad)


def test_hash_ignores_only_non_math_fields():
    base = _complete()
    h = config_hash(base)
    for key, value in [
        ("run.steps", 5),
        ("run.log_every", 7),
        ("run.checkpoint_every", 3),
        ("run.device", "cpu"),
        ("run.notes", "x"),
        ("data.num_workers", 2),
        ("data.cache_dir", "/tmp/cache"),
    ]:
        assert config_hash(apply_overrides(base, {key: value})) == h, key
    for key, value in [
        ("optim.lr", 2e-4),
        ("model.T", 500),
        ("run.seed", 1),
        ("optim.batch_size", 32),
        ("data.views", ["axial"]),
        ("data.manifest", "other.csv"),
        ("model.init", "/models/pretrained"),
    ]:
        changed = apply_overrides(base, {key: value})
        assert config_hash(changed) != h, key
        assert config_diff(base, changed) == [key]
    # every non-math field exists
    names = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert NON_MATH_FIELDS <= names


def test_hash_without_init_is_the_hash_of_runs_made_before_the_option():
    """``model.init = None`` is left out of the hash, so older checkpoints still resume."""
    base = _complete(**{"data.manifest": "/data/manifest.csv"})
    values = config_to_dict(base)
    del values["model"]["init"]
    math = {
        f"{section}.{key}": value
        for section, sub in values.items()
        for key, value in sub.items()
        if f"{section}.{key}" not in NON_MATH_FIELDS
    }
    old = hashlib.sha256(json.dumps(math, sort_keys=True).encode()).hexdigest()
    assert config_hash(base) == old


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    train_command.register(sub)
    return parser.parse_args(["train", *argv])


def test_cli_overrides_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  preset: tiny\n  n_slices: 9\noptim:\n  lr: 0.001\n  batch_size: 32\n"
        "data:\n  sources: [t2w]\n  target: pd\n"
    )
    args = _parse(
        [
            "--config", str(path),
            "--lr", "0.002",
            "--sources", "T1w", "T2w",
            "--target", "FLAIR",
            "--data", "m.csv",
            "--out", "run",
            "--no-ema-warmup",
            "--views", "axial",
            "--set", "optim.lr_step_at=0.5",
            "--set", "optim.batch_size=48",
            "--batch-size", "64",
        ]
    )  # fmt: skip
    config = validate(train_command.config_from_args(args))
    assert config.optim.lr == 0.002  # CLI flag beats YAML
    assert config.model.preset == "tiny" and config.model.n_slices == 9  # YAML beats default
    assert config.model.T == 1000  # default
    assert config.data.sources == ("t1w", "t2w") and config.data.target == "flair"
    assert config.optim.ema_warmup is False
    assert config.data.views == ("axial",)
    assert config.optim.lr_step_at == 0.5  # --set
    assert config.optim.batch_size == 64  # the dedicated flag beats --set
    assert config.run.out == "run"


def test_cli_resume_reads_the_runs_config(tmp_path):
    run_dir = tmp_path / "run"
    saved = _complete(**{"run.out": str(run_dir), "model.preset": "tiny", "optim.lr": 5e-4})
    save_config(saved, run_dir / "config.yaml")
    config = train_command.config_from_args(
        _parse(["--out", str(run_dir), "--resume", "--steps", "50"])
    )
    assert config.model.preset == "tiny" and config.optim.lr == 5e-4
    assert config.run.steps == 50
    # without --resume the run's config is not used
    fresh = train_command.config_from_args(_parse(["--out", str(run_dir)]))
    assert fresh.model.preset == "small"


def test_every_cli_flag_maps_to_a_typed_field():
    hints = {s: typing.get_type_hints(cls) for s, cls in SECTIONS.items()}
    for _flags, key, _kw in train_command.FLAGS:
        section, name = key.split(".")
        assert name in hints[section], key


def test_yaml_text_is_readable():
    text = config_yaml(_complete())
    assert "data:\n" in text and "  sources:\n  - t1w\n  - t2w\n" in text


def test_constants_match_the_modules_that_own_them():
    import yoda.config as config
    from yoda.data.normalize import NORMALIZATIONS
    from yoda.volume.views import VIEWS

    assert config.VIEWS == VIEWS and config.NORMALIZATIONS == NORMALIZATIONS
