"""Clinical covariates: encoding, bad input, fusion with every aggregator, runs, prediction and the ablation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from bag_helpers import pad

from mil.ablation import compare_arms, format_ablation
from mil.cohort import Bag, LabelColumn
from mil.commands.heatmap import run_heatmap
from mil.config import ConfigError, load_config
from mil.covariates import CovariateEncoder, CovariateError, RawCovariates, read_covariates
from mil.crossval import load_run_model, run_crossval, run_train
from mil.data import BagDataset, collate_bags
from mil.fusion import CovariateFusion, fit_covariates_only, warm_start_late_fusion
from mil.models import MODELS, create_model
from mil.predict import run_predict
from mil.tasks import create_task

D = 16
COVARIATES = ["cohort.covariates.numeric=[age,size_mm]", "cohort.covariates.categorical=[stage,site]"]


def raw(values: dict[str, list], numeric: list[str], categorical: list[str]) -> RawCovariates:
    df = pd.DataFrame(values, index=[f"B{i}" for i in range(len(next(iter(values.values()))))])
    return RawCovariates(numeric, categorical, df, {b: f"clinical.csv row {i + 2} (patient {b!r})" for i, b in enumerate(df.index)})


# ---------------------------------------------------------------- encoding
def test_encoder_uses_training_statistics_categories_and_indicators(tmp_path):
    r = raw({"age": [40.0, 60.0, np.nan, 80.0, 1000.0], "stage": ["I", "II", "II", None, "III"]}, ["age"], ["stage"])
    enc = CovariateEncoder.fit(r, ["B0", "B1", "B2", "B3"])  # B4 (test) must not move the statistics
    assert enc.mean["age"] == pytest.approx(60.0) and enc.std["age"] == pytest.approx(np.std([40, 60, 80]))
    assert enc.categories["stage"] == ["I", "II"] and enc.mode["stage"] == "II"
    assert enc.feature_names == ["age", "stage=I", "stage=II", "age_missing", "stage_missing"]
    assert enc.imputed_in_training == {"age": 1, "stage": 1}
    x, imputed = enc.transform(r, ["B0", "B1", "B2", "B3"])
    np.testing.assert_allclose(x[:, 0], [-np.sqrt(1.5), 0.0, 0.0, np.sqrt(1.5)], rtol=1e-5)  # missing age -> mean (0)
    np.testing.assert_array_equal(x[:, 1:3], [[1, 0], [0, 1], [0, 1], [0, 1]])  # missing stage -> mode II
    np.testing.assert_array_equal(x[:, 3:], [[0, 0], [0, 0], [1, 0], [0, 1]])
    assert imputed == {"age": 1, "stage": 1}
    enc.save(tmp_path / "covariates.json")
    again = CovariateEncoder.load(tmp_path / "covariates.json")
    np.testing.assert_array_equal(again.transform(r, ["B0", "B3"])[0], enc.transform(r, ["B0", "B3"])[0])
    assert json.loads((tmp_path / "covariates.json").read_text())["feature_names"] == enc.feature_names


def test_unseen_category_is_named_or_other():
    r = raw({"stage": ["I", "II", "IV", "V"]}, [], ["stage"])
    enc = CovariateEncoder.fit(r, ["B0", "B1"])
    with pytest.raises(CovariateError, match=r"row 4 \(patient 'B2'\): stage='IV'.*row 5 \(patient 'B3'\): stage='V'.*unseen_category=other"):
        enc.transform(r, ["B0", "B1", "B2", "B3"])
    other = CovariateEncoder.fit(r, ["B0", "B1"], unseen_category="other")
    np.testing.assert_array_equal(other.transform(r, ["B2", "B0"])[0], [[0, 0], [1, 0]])


def test_encoder_refuses_a_covariate_without_training_values():
    r = raw({"age": [np.nan, np.nan, 3.0]}, ["age"], [])
    with pytest.raises(CovariateError, match=r"\['age'\] have no value in the 2 training bags"):
        CovariateEncoder.fit(r, ["B0", "B1"])


# ---------------------------------------------------------------- reading the tables: bad input
@pytest.fixture(scope="module")
def covariate_cohort(synthetic_cohort, tmp_path_factory):
    """The shared synthetic cohort with age, size_mm, stage and site (some missing) in its clinical table."""
    tmp = tmp_path_factory.mktemp("covariates")
    clinical = pd.read_csv(synthetic_cohort.clinical_csv)
    rng = np.random.default_rng(0)
    clinical["size_mm"] = rng.uniform(5, 60, len(clinical)).round(1)
    clinical["stage"] = rng.choice(["I", "II", "III"], len(clinical))
    clinical["site"] = rng.choice(["colon", "rectum"], len(clinical))
    clinical.loc[[2, 7], "size_mm"] = np.nan
    clinical.loc[[4], "stage"] = None
    path = tmp / "clinical.csv"
    clinical.to_csv(path, index=False)
    keys = [f"cohort.clinical_csv={path}", f"cohort.slide_csv={synthetic_cohort.slide_csv}",
            f"cohort.features_dir={synthetic_cohort.features_dir}", "cohort.target=MSI", "cohort.classes=[MSS,MSI-H]"]
    return tmp, path, keys


def _bags(cfg) -> list[Bag]:
    from mil.cohort import load_cohort

    return load_cohort(cfg.cohort).bags


def test_missing_covariate_columns_are_all_named(covariate_cohort):
    _, _, keys = covariate_cohort
    cfg = load_config([*keys, "cohort.covariates.numeric=[age,weight]", "cohort.covariates.categorical=[grade]"])
    with pytest.raises(CovariateError, match=r"'weight', 'grade' not found in .*clinical.csv or .*slides.csv"):
        read_covariates(cfg.cohort, _bags(cfg))


def test_non_numeric_value_names_the_row(covariate_cohort, tmp_path):
    _, path, keys = covariate_cohort
    clinical = pd.read_csv(path)
    clinical["age"] = clinical["age"].astype(object)
    clinical.loc[3, "age"], clinical.loc[9, "age"] = "sixty", "n/a?"
    clinical.to_csv(tmp_path / "bad.csv", index=False)
    cfg = load_config([*keys, *COVARIATES, f"cohort.clinical_csv={tmp_path / 'bad.csv'}"])
    with pytest.raises(CovariateError, match=r"bad.csv row 5 \(patient_id 'P0003'\): age='sixty'; .*row 11 .*age='n/a\?'"):
        read_covariates(cfg.cohort, _bags(cfg))


def test_covariates_from_the_slide_table_must_agree_per_patient(covariate_cohort, synthetic_cohort, tmp_path):
    _, _, keys = covariate_cohort
    slides = pd.read_csv(synthetic_cohort.slide_csv)
    slides["scanner"] = [f"S{i % 2}" for i in range(len(slides))]
    slides.to_csv(tmp_path / "slides.csv", index=False)
    cfg = load_config([*keys, f"cohort.slide_csv={tmp_path / 'slides.csv'}", "cohort.covariates.categorical=[scanner]"])
    with pytest.raises(CovariateError, match="slides with different scanner values"):
        read_covariates(cfg.cohort, _bags(cfg))
    slide_cfg = load_config([*keys, f"cohort.slide_csv={tmp_path / 'slides.csv'}", "cohort.bag_level=slide",
                             "cohort.covariates.categorical=[scanner]"])
    r = read_covariates(slide_cfg.cohort, _bags(slide_cfg))
    assert set(r.values["scanner"]) == {"S0", "S1"}


def test_ablation_needs_covariates(covariate_cohort, fast_overrides, tmp_path):
    _, _, keys = covariate_cohort
    with pytest.raises(ConfigError, match="cv.ablation=true .* cohort.covariates"):
        run_crossval(load_config([*keys, *fast_overrides, "cv.ablation=true", f"output_dir={tmp_path}"]))


# ---------------------------------------------------------------- fusion: one wrapper, every aggregator
@pytest.mark.parametrize("fusion", ["late", "film"])
@pytest.mark.parametrize("name", MODELS.names())
def test_fusion_contract(name, fusion):
    torch.manual_seed(0)
    base = create_model(name, D, 3).eval()
    fused = CovariateFusion(base, 5, fusion).eval()
    with torch.no_grad():
        for p in fused.parameters():  # FiLM starts as the identity: move it so the test can fail
            if p.ndim and p.shape[-1] == 5:
                p.normal_()
    bags = [torch.randn(n, D) for n in (7, 12, 3)]
    x, mask = pad(bags)
    c = torch.randn(3, 5)
    out, plain = fused(x, mask, covariates=c), base(x, mask)
    assert out.logits.shape == (3, 3)
    # Attention is the aggregator's own, unchanged by the covariates (heatmaps keep working).
    if plain.attention is None:
        assert out.attention is None
    else:
        torch.testing.assert_close(out.attention, plain.attention)
        torch.testing.assert_close(fused(x, mask, covariates=c * 3).attention, plain.attention)
    assert not torch.allclose(out.logits, fused(x, mask, covariates=c + 1).logits)  # covariates matter
    for i, b in enumerate(bags):  # padding does not change the fused output
        alone = fused(b[None], None, covariates=c[i : i + 1])
        torch.testing.assert_close(alone.logits, out.logits[i : i + 1], atol=1e-4, rtol=1e-4)
    fused.train()
    fused(x, mask, covariates=c).logits.sum().backward()
    extra = [p for n, p in fused.named_parameters() if not n.startswith("model.")]
    assert extra and all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra)
    with pytest.raises(ValueError, match="trained with 5 encoded covariates"):
        fused(x, mask)


def test_late_fusion_is_concatenation_before_a_linear_head():
    torch.manual_seed(0)
    base = create_model("abmil", D, 2, hidden_dim=8).eval()
    fused = CovariateFusion(base, 3, "late").eval()
    x, c = torch.randn(4, 9, D), torch.randn(4, 3)
    out = fused(x, None, covariates=c)
    e = base(x).embedding
    weight = torch.cat([base.head.weight, fused.covariate_head.weight], dim=1)  # head over [e; c]
    torch.testing.assert_close(out.logits, torch.cat([e, c], 1) @ weight.T + base.head.bias)
    torch.testing.assert_close(out.embedding, torch.cat([e, c], 1))


def test_film_starts_as_the_identity_and_modulates_the_embedding():
    torch.manual_seed(0)
    base = create_model("gated_abmil", D, 2, hidden_dim=8).eval()
    fused = CovariateFusion(base, 2, "film").eval()
    x, c = torch.randn(3, 6, D), torch.randn(3, 2)
    torch.testing.assert_close(fused(x, None, covariates=c).logits, base(x).logits)
    with torch.no_grad():
        fused.film.bias[:8] = 1.0  # gamma = 1: the embedding doubles
    out = fused(x, None, covariates=c)
    torch.testing.assert_close(out.embedding, 2 * base(x).embedding)
    torch.testing.assert_close(out.logits, base.classify(2 * base(x).embedding))


def test_batches_carry_covariates():
    bags = [Bag("a", "a", ["a"], [], None, 3), Bag("b", "b", ["b"], [], None, 3)]
    ds = BagDataset(bags, torch.tensor([0, 1]), covariates=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    ds._cache = {0: torch.zeros(3, 4), 1: torch.ones(2, 4)}
    batch = collate_bags([ds[0], ds[1]])
    torch.testing.assert_close(batch["covariates"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    plain = BagDataset(bags)
    plain._cache = ds._cache
    assert "covariates" not in collate_bags([plain[0], plain[1]])


# ---------------------------------------------------------------- covariates-only linear model, each task's loss
def test_covariates_only_model_fits_each_task_loss():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((200, 3)).astype(np.float32))
    cls_task = create_task(load_config(["cohort.target=y"]), [LabelColumn("y", classes=["0", "1"])])
    y = (x[:, 0] + 0.3 * torch.randn(200) > 0).long()
    model = fit_covariates_only(cls_task, x, y, l2=1e-2)
    probs = model(torch.zeros(200, 1, 1), None, covariates=x).logits.softmax(-1)[:, 1].detach()
    assert ((probs > 0.5).long() == y).float().mean() > 0.85
    w = model.linear.weight.detach()
    assert (w[1, 0] - w[0, 0]) > 2 * (w[1, 1:] - w[0, 1:]).abs().max()  # the signal column dominates


def test_covariates_only_model_uses_cox_and_least_squares_losses():
    from mil.metrics import concordance_index

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((300, 2)).astype(np.float32))
    time = rng.exponential(1 / np.exp(1.5 * x[:, 0].numpy()))
    event = rng.random(300) < 0.8
    cfg = load_config(["task.type=survival", "task.time=T", "task.event=E", "cohort.target=null"])
    surv = create_task(cfg, [LabelColumn("T", kind="time", key="task.time"), LabelColumn("E", kind="event", key="task.event")])
    y = torch.tensor(np.stack([time, event], 1), dtype=torch.float32)
    model = fit_covariates_only(surv, x, y, l2=1e-3)
    risk = model(torch.zeros(300, 1, 1), None, covariates=x).logits[:, 0].detach().numpy()
    assert concordance_index(risk, time, event) > 0.75
    w = model.model.linear.weight.detach()[0]
    assert 1.0 < w[0] < 2.0 and abs(w[1]) < 0.3  # the Cox coefficient of the true model (1.5)
    reg = create_task(load_config(["task.type=regression", "cohort.target=TMB"]), [LabelColumn("TMB", kind="number")])
    target = torch.from_numpy((10 + 3 * x[:, 1].numpy() + rng.normal(0, 0.3, 300)).astype(np.float32))
    pred = fit_covariates_only(reg, x, target, l2=1e-3)(torch.zeros(300, 1, 1), None, covariates=x).logits[:, 0].detach()
    assert float(torch.corrcoef(torch.stack([pred, target]))[0, 1]) > 0.99 and abs(float(pred.mean()) - 10) < 0.2


def test_late_fusion_is_warm_started_from_the_covariates_only_fit():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((80, 3)).astype(np.float32))
    y = (x[:, 0] > 0).long()
    task = create_task(load_config(["cohort.target=y"]), [LabelColumn("y", classes=["0", "1"])])
    torch.manual_seed(0)
    fused = CovariateFusion(create_model("abmil", D, 2, hidden_dim=8), 3, "late")
    assert (fused.covariate_head.weight == 0).all()  # from scratch: starts as the slide model
    assert warm_start_late_fusion(fused, task, x, y, l2=1e-2)
    expected = fit_covariates_only(task, x, y, l2=1e-2).linear.weight
    torch.testing.assert_close(fused.covariate_head.weight, expected)
    assert not warm_start_late_fusion(CovariateFusion(create_model("abmil", D, 2), 3, "film"), task, x, y, l2=1e-2)


# ---------------------------------------------------------------- runs: crossval, predict, heatmap, ablation
@pytest.fixture(scope="module")
def fused_run(covariate_cohort):
    tmp, _, keys = covariate_cohort
    fast = ["model.args={hidden_dim: 32}", "cv.folds=3", "cv.bootstrap=50", "train.max_epochs=3", "train.min_epochs=1",
            "train.min_steps=0", "train.warmup_steps=0",
            "train.batch_size=4", "train.bag_size=16", "train.lr=3e-3", "train.precision=32-true",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.logger=none",
            "cv.inner_folds=0"]  # one model per fold (an ensemble with covariates is tested below)
    out = run_crossval(load_config([*keys, *fast, *COVARIATES, "cv.ablation=true", f"output_dir={tmp / 'cv'}"]))
    return out, keys


def test_crossval_with_covariates_saves_encoders_and_ablation(fused_run):
    out, _ = fused_run
    for k in range(3):
        enc = json.loads((out / f"fold_{k}" / "covariates.json").read_text())
        assert enc["feature_names"][:2] == ["age", "size_mm"] and "size_mm_missing" in enc["feature_names"]
        summary = json.loads((out / f"fold_{k}" / "summary.json").read_text())
        assert set(summary["covariates_imputed"]) == {"train", "val", "test"}
        assert 0.0 <= summary["threshold"] <= 1.0  # chosen on the validation bags with their covariates
        slides = pd.read_csv(out / f"fold_{k}" / "slide_predictions.csv")
        assert slides["prob_MSI-H"].between(0, 1).all()  # each slide with its patient's covariates
        for arm in ("slide_only", "covariates_only"):
            assert (out / f"fold_{k}" / "ablation" / arm / "predictions.csv").is_file()
    imputed = sum(json.loads((out / f"fold_{k}" / "summary.json").read_text())["covariates_imputed"]["test"]["size_mm"]
                  for k in range(3))
    assert imputed == 2  # each patient is tested once; two have no size_mm
    metrics = json.loads((out / "metrics.json").read_text())
    ablation = metrics["ablation"]
    assert ablation["metric"] == "auroc" and set(ablation["arms"]) == {"slide_only", "covariates_only", "fused"}
    assert metrics["pooled"]["auroc"]["value"] == pytest.approx(ablation["arms"]["fused"]["value"])
    d = ablation["differences"]["fused_minus_covariates_only"]
    assert d["ci_low"] <= d["value"] <= d["ci_high"] and 0 <= d["p_bootstrap"] <= 1
    summary = (out / "summary.md").read_text()
    assert "## Ablation: slide, covariates, both" in summary and "| covariates only |" in summary
    assert (out / "ablation" / "slide_only" / "metrics.json").is_file()
    model = load_run_model(out, out / "fold_0" / "model.safetensors")
    saved = json.loads((out / "fold_0" / "covariates.json").read_text())
    assert model.covariate_encoder.feature_names == saved["feature_names"]


def test_predict_reuses_the_encoders_and_refuses_missing_covariates(fused_run, covariate_cohort, tmp_path):
    out, keys = fused_run
    _, path, _ = covariate_cohort
    pred = run_predict(out, [*keys, f"output_dir={tmp_path / 'p'}"])
    assert len(pd.read_csv(pred / "predictions.csv")) == 30
    assert (pred / "slide_predictions.csv").is_file()
    clinical = pd.read_csv(path).drop(columns=["stage"])
    clinical.to_csv(tmp_path / "nostage.csv", index=False)
    with pytest.raises(CovariateError, match=r"'stage' not found .*the run .* was trained with them"):
        run_predict(out, [*keys, f"cohort.clinical_csv={tmp_path / 'nostage.csv'}", f"output_dir={tmp_path / 'q'}"])
    with pytest.raises(CovariateError, match=r"trained with covariates \['age', 'size_mm', 'stage', 'site'\], but none are given"):
        run_predict(out, [*keys, "cohort.covariates.numeric=[]", "cohort.covariates.categorical=[]",
                          f"output_dir={tmp_path / 'r'}"])
    unseen = pd.read_csv(path)
    unseen.loc[5, "stage"] = "IV"
    unseen.to_csv(tmp_path / "unseen.csv", index=False)
    with pytest.raises(CovariateError, match=r"unseen.csv row 7 \(patient_id 'P0005'\): stage='IV'"):
        run_predict(out, [*keys, f"cohort.clinical_csv={tmp_path / 'unseen.csv'}", f"output_dir={tmp_path / 's'}"])


def test_heatmap_of_a_fused_run(fused_run, tmp_path):
    out, _ = fused_run
    written = run_heatmap(out, [], ["P0001-S0"], top_k=2, out_dir=tmp_path / "maps", max_px=256)
    scores = pd.read_csv(tmp_path / "maps" / "P0001-S0_scores.csv")
    assert {p.name for p in written} >= {"P0001-S0_heatmap.png", "P0001-S0_scores.csv"}
    assert len(scores) > 0 and (scores.score >= 0).all() and scores.score.max() > 0


def test_inner_ensemble_with_covariates_ablation_predict_and_heatmap(covariate_cohort, tmp_path):
    """Each inner model of ``cv.inner_folds`` (no refit) keeps its own covariate encoder, in the fold,
    in its ablation arm, and when `mil predict` and the heatmaps average them."""
    _, _, keys = covariate_cohort
    fast = ["model.args={hidden_dim: 16}", "cv.folds=3", "cv.bootstrap=20", "train.max_epochs=2", "train.min_epochs=1",
            "train.min_steps=0", "train.warmup_steps=0", "train.batch_size=4", "train.bag_size=16",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.logger=none",
            "cv.inner_folds=2", "train.refit=false"]
    out = run_crossval(load_config([*keys, *fast, *COVARIATES, "cv.ablation=true", f"output_dir={tmp_path / 'cv'}"]))
    for k in range(3):
        for j in range(2):
            assert (out / f"fold_{k}" / f"inner_{j}" / "covariates.json").is_file()
            assert (out / f"fold_{k}" / "ablation" / "slide_only" / f"inner_{j}" / "model.safetensors").is_file()
        imputed = json.loads((out / f"fold_{k}" / "summary.json").read_text())["covariates_imputed"]["test"]
        assert len(imputed) == 2  # one record per inner model's encoder
    assert "slide_only" in json.loads((out / "metrics.json").read_text())["ablation"]["arms"]
    pred = pd.read_csv(run_predict(out, [*keys, f"output_dir={tmp_path / 'p'}"]) / "predictions.csv")
    assert len(pred) == 30 and "fold_2.inner_1.prob_MSI-H" in pred.columns
    written = run_heatmap(out, [], ["P0001-S0"], top_k=2, out_dir=tmp_path / "maps", max_px=256)
    assert any(p.name == "P0001-S0_heatmap.png" for p in written)


def test_train_run_with_film_fusion_predicts(covariate_cohort, fast_overrides, tmp_path):
    _, _, keys = covariate_cohort
    out = run_train(load_config([*keys, *fast_overrides, *COVARIATES, "model.fusion=film", "model.name=clam_mb",
                                 f"output_dir={tmp_path / 't'}"]))
    assert (out / "covariates.json").is_file()
    pred = pd.read_csv(run_predict(out, [*keys, f"output_dir={tmp_path / 'p'}"]) / "predictions.csv")
    assert pred["prob_MSI-H"].between(0, 1).all()


def test_paired_bootstrap_detects_a_real_difference():
    rng = np.random.default_rng(1)
    n = 120
    y = rng.integers(0, 2, n)
    good, bad = y + rng.normal(0, 0.4, n), y + rng.normal(0, 3.0, n)

    def frame(score):
        s = 1 / (1 + np.exp(-score))
        return pd.DataFrame({"patient_id": [f"P{i}" for i in range(n)], "MSI": np.where(y, "MSI-H", "MSS"),
                             "fold": [f"fold_{i % 3}" for i in range(n)], "prob_MSS": 1 - s, "prob_MSI-H": s})

    task = create_task(load_config(["cohort.target=MSI"]), [LabelColumn("MSI", classes=["MSS", "MSI-H"])])
    result = compare_arms({"slide_only": frame(bad), "covariates_only": frame(bad), "fused": frame(good)},
                          task, "patient_id", 300, 0)
    d = result["differences"]["fused_minus_covariates_only"]
    assert d["value"] > 0.1 and d["ci_low"] > 0 and d["p_bootstrap"] < 0.05
    assert "slide + covariates − covariates only" in format_ablation(result)
