"""Task types without training loops: losses, metrics, every aggregator with every task, bad input."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from mil.cohort import CohortError, LabelColumn, load_cohort
from mil.config import ConfigError, load_config
from mil.metrics import concordance_index, confusion_scores, logrank_p, regression_metrics
from mil.models import MODELS, create_model
from mil.splits import SplitError
from mil.tasks import TASKS, create_task, task_class, task_from_meta
from mil.tasks.multi_target import MultiTargetLoss
from mil.tasks.survival import cox_loss
from mil.training import MILModule

# ---------------------------------------------------------------- reference implementations (plain loops)


def naive_cox(risk, time, event):
    """Breslow partial likelihood, straight from its definition."""
    total, n_events = 0.0, 0
    for i in range(len(risk)):
        if event[i]:
            at_risk = [j for j in range(len(risk)) if time[j] >= time[i]]
            total += risk[i] - math.log(sum(math.exp(risk[j]) for j in at_risk))
            n_events += 1
    return -total / n_events


def naive_cindex(risk, time, event):
    concordant = comparable = 0.0
    for i, j in itertools.permutations(range(len(risk)), 2):
        if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
            comparable += 1
            concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


def test_cox_loss_matches_definition_with_ties():
    rng = np.random.default_rng(0)
    time = rng.integers(1, 8, 40).astype(float)  # many tied times
    event = (rng.random(40) < 0.6).astype(float)
    risk = rng.standard_normal(40)
    got = cox_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event)).item()
    assert got == pytest.approx(naive_cox(risk, time, event), rel=1e-9)
    zero = cox_loss(torch.tensor(risk, requires_grad=True), torch.tensor(time), torch.zeros(40))
    assert zero.item() == 0.0 and zero.requires_grad  # no events: no gradient, no NaN


def test_concordance_matches_definition_with_ties():
    rng = np.random.default_rng(1)
    time = rng.integers(1, 10, 60).astype(float)
    event = rng.random(60) < 0.7
    risk = rng.integers(0, 5, 60).astype(float)  # tied risks count 1/2
    assert concordance_index(risk, time, event, chunk=7) == pytest.approx(naive_cindex(risk, time, event))
    assert concordance_index(-time, time, np.ones(60)) == pytest.approx(1.0, abs=0.06)  # ties in time only
    assert math.isnan(concordance_index(risk, time, np.zeros(60)))


def test_logrank_and_regression_metrics():
    rng = np.random.default_rng(2)
    high = np.arange(200) < 100
    time = rng.exponential(np.where(high, 1.0, 4.0))
    event = rng.random(200) < 0.8
    assert logrank_p(time, event, high) < 1e-6
    assert logrank_p(time, event, rng.random(200) < 0.5) > 0.01
    assert math.isnan(logrank_p(time, event, np.ones(200, bool)))
    y = rng.standard_normal(50)
    m = regression_metrics(y, 2 * y + 1)
    assert m["pearson"] == pytest.approx(1) and m["spearman"] == pytest.approx(1) and m["r2"] < 0
    assert regression_metrics(y, y)["mae"] == 0 and math.isnan(regression_metrics(y, np.zeros(50))["pearson"])


def test_confusion_scores_match_scikit_learn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    rng = np.random.default_rng(3)
    for k, n in itertools.product((2, 3, 5), (1, 4, 30)):
        for _ in range(10):
            y, pred = rng.integers(0, k, n), rng.integers(0, max(1, k - 1), n)  # the last class is never predicted
            got = confusion_scores(y, pred, k)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                f1 = f1_score(y, pred, pos_label=1, zero_division=0) if k == 2 else \
                    f1_score(y, pred, average="macro", labels=list(range(k)), zero_division=0)
                assert got == pytest.approx({"balanced_accuracy": balanced_accuracy_score(y, pred),
                                             "accuracy": accuracy_score(y, pred), "f1": f1})


def test_multi_target_loss_ignores_missing_labels():
    logits = torch.randn(6, 5, requires_grad=True)  # targets of 2 and 3 classes
    target = torch.tensor([[0, -1], [1, -1], [1, -1], [0, -1], [-1, -1], [1, -1]])
    loss = MultiTargetLoss([slice(0, 2), slice(2, 5)], [None, None])(logits, target)
    valid = target[:, 0] >= 0
    expected = torch.nn.functional.cross_entropy(logits[valid, :2], target[valid, 0])
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert logits.grad[:, 2:].abs().sum() == 0 and logits.grad[4].abs().sum() == 0  # unlabelled: no gradient


# ---------------------------------------------------------------- every aggregator with every task

TASK_COLUMNS = {
    "classification": [LabelColumn("grade", classes=["G1", "G2", "G3"])],
    "multi_target": [LabelColumn("MSI", classes=["MSS", "MSI-H"], optional=True),
                     LabelColumn("subtype", classes=["a", "b", "c"], optional=True)],
    "regression": [LabelColumn("TMB", "number")],
    "survival": [LabelColumn("OS", "time"), LabelColumn("event", "event")],
}


def _targets(name: str, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if name == "classification":
        return torch.tensor([0, 1, 2, 1])[:b]
    if name == "multi_target":
        return torch.tensor([[0, 2], [1, -1], [-1, 0], [1, 1]])[:b]
    if name == "regression":
        return torch.rand(b, generator=g) * 30
    return torch.stack([torch.rand(b, generator=g) * 50, torch.tensor([1.0, 0.0, 1.0, 1.0])[:b]], dim=1)


@pytest.mark.parametrize(("model_name", "task_name"), list(itertools.product(MODELS.names(), TASK_COLUMNS)))
def test_every_aggregator_trains_every_task(model_name, task_name):
    torch.manual_seed(0)
    task = TASKS.get(task_name)(TASK_COLUMNS[task_name])
    targets = _targets(task_name, 4)
    model = task.wrap(create_model(model_name, 8, task.n_outputs, hidden_dim=16), targets)
    module = MILModule(model, task, task.make_loss(targets)).train()
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[1, 7:] = False
    batch = {"features": torch.randn(4, 12, 8), "mask": mask, "target": targets}
    loss, logits = module.compute_loss(batch)
    assert logits.shape == (4, task.n_outputs) and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    module.val_metrics.update(logits.detach(), targets)
    assert set(task.monitor_modes) >= {"val_loss"} | {f"val_{k}" for k in module.val_metrics.compute() if k != "loss"}
    columns = task.predictions(logits.detach().numpy())
    assert list(columns) == task.prediction_names and all(len(v) == 4 for v in columns.values())


def test_regression_outputs_are_in_target_units():
    task = TASKS.get("regression")(TASK_COLUMNS["regression"])
    targets = torch.tensor([100.0, 120.0, 140.0, 160.0])
    model = task.wrap(create_model("mean_pool", 8, 1, hidden_dim=8), targets)
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 8)).logits
    assert set(model.state_dict()) >= {"shift", "scale"} and model.shift.item() == 130.0
    assert (out - 130).abs().max() < 3 * model.scale.item()  # an untrained model predicts near the training mean


# ---------------------------------------------------------------- configuration and bad input


def test_task_config_errors():
    with pytest.raises(KeyError, match="Unknown task 'survivl'. Did you mean 'survival'"):
        task_class(load_config(["task.type=survivl"]))
    with pytest.raises(ConfigError, match="task.time is set but task.type=classification does not use it"):
        task_class(load_config(["cohort.target=MSI", "task.time=OS"]))
    with pytest.raises(ConfigError, match="cohort.target is set but task.type=multi_target"):
        task_class(load_config(["cohort.target=MSI", "task.type=multi_target", "task.targets=[{column: BRAF}]"]))
    with pytest.raises(ConfigError, match="task.loss='cox' does not apply to task.type=regression"):
        create_task(load_config(["task.type=regression", "cohort.target=TMB", "task.loss=cox"]), TASK_COLUMNS["regression"])
    cfg = load_config(["task.type=multi_target", "task.stratify=KRAS", "task.targets=[{column: MSI}, {column: subtype}]"])
    with pytest.raises(ConfigError, match="task.stratify='KRAS' is not one of the task.targets columns"):
        create_task(cfg, TASK_COLUMNS["multi_target"])
    with pytest.raises(ConfigError, match=r"invalid value for .*colum"):
        load_config(["task.type=multi_target", "task.targets=[{colum: MSI}]"])


@pytest.fixture(scope="module")
def tmb_cohort(tmp_path_factory, make_task_cohort):
    return make_task_cohort(tmp_path_factory.mktemp("tmb"), "tmb", 12, tiles_per_slide=(4, 6), seed=1)


def _cohort_cfg(c, clinical, *extra):
    return load_config([f"cohort.clinical_csv={clinical}", f"cohort.slide_csv={c.slide_csv}",
                        f"cohort.features_dir={c.features_dir}", *extra])


@pytest.mark.parametrize(
    ("column", "value", "overrides", "message"),
    [
        ("TMB", "high", ["task.type=regression", "cohort.target=TMB"], r"clinical.csv: TMB value 'high' for 'P0003' is not a number \(row 5\)"),
        ("TMB", "inf", ["task.type=regression", "cohort.target=TMB"], r"TMB value 'inf' for 'P0003' is not a number"),
        ("OS", "-3", ["task.type=survival", "task.time=OS", "task.event=TMB"],
         r"clinical.csv: OS value '-3' for 'P0003' is negative; survival times must be >= 0 \(row 5\)"),
        ("TMB", "2", ["task.type=survival", "task.time=OS", "task.event=TMB"],
         r"TMB value '2' for 'P0003' must be 0 \(censored\) or 1 \(event\) \(row 5\)"),
    ],
)
def test_bad_values_name_the_row(tmb_cohort, tmp_path, column, value, overrides, message):
    clinical = pd.read_csv(tmb_cohort.clinical_csv)
    clinical["OS"] = 10.0
    if "task.event=TMB" in overrides:
        clinical["TMB"] = 1
    clinical[column] = clinical[column].astype(object)
    clinical.loc[3, column] = value
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    cfg = _cohort_cfg(tmb_cohort, tmp_path / "clinical.csv", *overrides)
    cls = task_class(cfg)
    with pytest.raises(CohortError, match=message):
        load_cohort(cfg.cohort, columns=cls.label_columns(cfg))


def test_single_class_in_training_fold_is_an_error_with_counts(tmb_cohort, tmp_path):
    clinical = pd.read_csv(tmb_cohort.clinical_csv)
    clinical["KRAS"] = ["mutant"] + ["wild-type"] * (len(clinical) - 1)
    clinical["MSI"] = ["MSI-H", "MSS"] * (len(clinical) // 2)
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    cfg = _cohort_cfg(tmb_cohort, tmp_path / "clinical.csv", "task.type=multi_target",
                      "task.targets=[{column: MSI}, {column: KRAS, classes: [wild-type, mutant]}]")
    cohort = load_cohort(cfg.cohort, columns=task_class(cfg).label_columns(cfg))
    task = create_task(cfg, cohort.columns)
    train = [b for b in cohort.bags if b.labels["KRAS"] == "wild-type"]
    with pytest.raises(SplitError, match=r"fold_0 \(target KRAS\) needs at least 1 patients of every class, "
                                         r"but has wild-type: 11, mutant: 0 \(too few: mutant\)"):
        task.check_split(train, "the training split of fold_0", training=True)
    survival = create_task(load_config(["task.type=survival", "task.time=OS", "task.event=E"]),
                           [*TASK_COLUMNS["survival"][:1], LabelColumn("E", "event")])
    for b in train:
        b.labels.update({"OS": "5", "E": "0"})
    with pytest.raises(SplitError, match=r"has no events \(11 censored bags\)"):
        survival.check_split(train, "the training split of fold_0", training=True)


def test_multi_target_keeps_partially_labelled_bags(tmb_cohort, tmp_path):
    clinical = pd.read_csv(tmb_cohort.clinical_csv)
    clinical["MSI"] = ["MSI-H", "MSS", None, None] * 3
    clinical["BRAF"] = ["mutant", None, "wild-type", None] * 3
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    cfg = _cohort_cfg(tmb_cohort, tmp_path / "clinical.csv", "task.type=multi_target",
                      "task.targets=[{column: MSI}, {column: BRAF}]")
    cohort = load_cohort(cfg.cohort, columns=task_class(cfg).label_columns(cfg))
    assert len(cohort.bags) == 9  # every fourth patient has neither label
    slides = cohort.skipped[cohort.skipped.kind == "slide"]
    assert set(slides.reason) == {"missing all labels (MSI, BRAF)"}
    assert cohort.skipped[cohort.skipped.kind == "patient"].reason.str.endswith("missing all labels (MSI, BRAF)").all()
    targets = create_task(cfg, cohort.columns).encode(cohort.bags)
    assert targets.shape == (9, 2) and (targets == -1).sum() == 6


def test_run_folders_from_before_task_types_are_classification():
    meta = OmegaConf.create({"kind": "crossval", "target": "MSI", "classes": ["MSS", "MSI-H"], "in_dim": 16})
    task = task_from_meta(meta)
    assert task.name == "classification" and task.n_outputs == 2 and task.prediction_names == ["prob_MSS", "prob_MSI-H"]
    again = task_from_meta(OmegaConf.create({**OmegaConf.to_container(meta), **task.metadata()}))
    assert again.columns == task.columns


@pytest.mark.parametrize("scheduler", ["none", "constant"])
def test_the_optimiser_gives_each_parameter_group_its_share_of_the_learning_rate(scheduler):
    task = TASKS.get("classification")(TASK_COLUMNS["classification"])
    model = create_model("gated_abmil", 8, task.n_outputs, hidden_dim=16, attn_lr_scale=0.3)
    module = MILModule(model, task, task.make_loss(torch.tensor([0, 1, 2])), lr=1e-3, scheduler=scheduler)
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()  # what Lightning sets before this call
    configured = module.configure_optimizers()
    opt = configured if scheduler == "none" else configured["optimizer"]
    lr_of = {id(p): g["initial_lr" if scheduler != "none" else "lr"] for g in opt.param_groups for p in g["params"]}
    assert [lr_of[id(p)] for p in model.pool.parameters()] == pytest.approx([3e-4] * len(list(model.pool.parameters())))
    assert [lr_of[id(p)] for p in model.head.parameters()] == pytest.approx([1e-3, 1e-3])
