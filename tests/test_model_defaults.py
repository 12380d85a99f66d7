"""Per-model training defaults: declared in the model's registry entry, applied by load_config."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

from mil.config import ConfigError, load_config
from mil.models import MODELS, model_train_defaults
from mil.registry import Registry, UnknownKeyError

TOOLKIT_LR = load_config([]).train.lr


def test_registry_keeps_metadata_per_entry() -> None:
    reg: Registry[object] = Registry("thing")
    reg.register("plain")(object)
    reg.register("tuned", train_defaults={"lr": 1.0})(dict)
    assert reg.info("plain") == {} and reg.info("tuned") == {"train_defaults": {"lr": 1.0}}
    reg.info("tuned")["train_defaults"]["lr"] = 5.0  # a copy: the entry is unchanged
    assert reg.info("tuned")["train_defaults"]["lr"] == 1.0
    with pytest.raises(UnknownKeyError, match="Did you mean 'tuned'"):
        reg.info("tuend")


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_default_is_a_valid_train_key(name: str) -> None:
    defaults = model_train_defaults(name)
    cfg = load_config([f"model.name={name}"])  # an unknown key or a wrong type raises ConfigError
    for key, value in defaults.items():
        assert cfg.train[key] == value


def test_dsmil_trains_with_its_own_lr_unless_the_user_sets_one(tmp_path, caplog) -> None:
    assert model_train_defaults("dsmil") == {"lr": 1e-3}
    with caplog.at_level(logging.INFO, logger="mil.config"):
        assert load_config(["model.name=dsmil"]).train.lr == 1e-3
    assert "train.lr=0.001" in caplog.text
    assert load_config(["model.name=gated_abmil"]).train.lr == TOOLKIT_LR
    # Explicit settings win, wherever they come from and in whichever order.
    assert load_config(["model.name=dsmil", f"train.lr={TOOLKIT_LR}"]).train.lr == TOOLKIT_LR
    assert load_config([f"train.lr={TOOLKIT_LR}", "model.name=dsmil"]).train.lr == TOOLKIT_LR
    yaml = tmp_path / "exp.yaml"
    yaml.write_text("model:\n  name: dsmil\ntrain:\n  lr: 3.0e-4\n")
    assert load_config([str(yaml)]).train.lr == 3e-4
    # A saved run's config (already resolved) is reproduced exactly.
    saved = OmegaConf.create(OmegaConf.to_container(load_config(["model.name=dsmil", "train.lr=5e-5"])))
    assert load_config(base=saved).train.lr == 5e-5


def test_transmil_trains_at_its_reference_learning_rate() -> None:
    # Shao et al.'s configuration (Camelyon/TransMIL.yaml): lr 2e-4; the toolkit's 5e-4 overfit small cohorts.
    assert model_train_defaults("transmil") == {"lr": 2e-4}
    assert load_config(["model.name=transmil"]).train.lr == 2e-4
    assert load_config(["model.name=transmil", "train.lr=1e-3"]).train.lr == 1e-3


def test_a_bad_model_default_names_the_model(monkeypatch) -> None:
    monkeypatch.setitem(MODELS._info, "abmil", {"train_defaults": {"lrr": 1e-3}})
    with pytest.raises(ConfigError, match=r"train_defaults of model 'abmil'.*train.lrr.*did you mean 'train.lr'"):
        load_config(["model.name=abmil"])
