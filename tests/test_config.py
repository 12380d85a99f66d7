"""Config schema: every shipped YAML validates; typos are errors with a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mil.config import ConfigError, config_changes, flat_config, load_config, require

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_config_validates(path):
    cfg = load_config([str(path)])
    OmegaConf.to_container(cfg, resolve=True)  # interpolations resolve
    if cfg.model.name:
        from mil.models import MODELS

        assert cfg.model.name in MODELS


def test_overrides_merge_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  lr: 0.01\ncv:\n  folds: 3\n")
    cfg = load_config([str(a), "train.lr=0.5", "cohort.classes=[a,b]"])
    assert cfg.train.lr == 0.5 and cfg.cv.folds == 3 and list(cfg.cohort.classes) == ["a", "b"]
    assert cfg.train.batch_size == 1  # schema default


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'"),
        ("cohort.bag_levl=slide", "did you mean 'cohort.bag_level'"),
        ("trainr.devices=2", "unknown config key 'trainr'"),
        ("train.lr=fast", "invalid value for train.lr"),
    ],
)
def test_bad_keys_and_values(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config([item])


def test_bad_key_in_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cohort:\n  targett: MSI\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'cohort.targett'; did you mean 'cohort.target'"):
        load_config([str(bad)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([str(tmp_path / "nope.yaml")])


def test_model_args_are_free_form():
    cfg = load_config(["model.args.hidden_dim=64", "model.args.embed_dims=[8,4]"])
    assert cfg.model.args.hidden_dim == 64


def test_require_lists_all_missing():
    with pytest.raises(ConfigError, match="cohort.slide_csv, cohort.target"):
        require(load_config([]), ["cohort.slide_csv", "cohort.target"], "crossval")


def test_config_changes_names_every_changed_added_and_removed_key_and_skips_ignored_ones():
    before = flat_config(load_config(["train.lr=1e-3", "output_dir=a"]))
    now = {**flat_config(load_config(["train.lr=5e-4", "output_dir=b", "train.seed=7"])), "new.key": 1}
    del now["cv.folds"]
    assert config_changes(before, now, ignore={"output_dir"}) == [
        f"cv.folds: {before['cv.folds']!r} -> None", "new.key: None -> 1", "train.lr: 0.001 -> 0.0005",
        f"train.seed: {before['train.seed']!r} -> 7",
    ]
    assert config_changes(before, before) == []


def test_training_numbers_out_of_range_are_all_named_at_load():
    with pytest.raises(ConfigError) as e:
        load_config(["train.lr=-1", "train.batch_size=0", "train.momentum=1.5", "train.patience=0"])
    message = str(e.value)
    for part in ("train.lr=-1.0 (must be > 0)", "train.batch_size=0 (must be >= 1)", "train.momentum=1.5 (must be in [0, 1))",
                 "train.patience=0 (must be >= 1, or null for no early stopping)"):
        assert part in message
    assert load_config(["train.patience=null", "train.bag_size=null", "train.aux_loss_weight=0"]).train.bag_size is None


def test_an_unknown_model_name_fails_at_load_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"model.name: Unknown model 'gated_abmill'. Did you mean 'gated_abmil'\?"):
        load_config(["model.name=gated_abmill"])


def test_an_unknown_model_and_a_bad_number_are_named_together():
    with pytest.raises(ConfigError, match=r"invalid settings: model.name: Unknown model 'abmill'.*; train.lr=-1.0"):
        load_config(["model.name=abmill", "train.lr=-1"])
