"""Clinical covariates beside the slide: reading, checking and encoding them per fold.

``cohort.covariates.numeric`` and ``cohort.covariates.categorical`` name columns of the clinical
table (one row per patient) or, when it lacks them, of the slide table. They are read once per
run into :class:`RawCovariates` (one row per bag), then encoded by a :class:`CovariateEncoder`
fitted on the training patients of each fold only:

- numeric: z-scored with the training fold's mean and standard deviation;
- categorical: one-hot over the categories seen in training (an unseen category is an error
  naming the row and value, or, with ``unseen_category: other``, an all-zero "other" row);
- missing values: imputed from the training fold (the mean, i.e. 0 after z-scoring, or the
  most frequent category), with a 0/1 indicator column for every covariate that had missing
  values in training (scikit-learn's ``SimpleImputer(add_indicator=True)`` convention); the
  number of imputed values per column is logged and saved.

The encoder is saved as JSON beside each fold's weights (``covariates.json``, never pickle) and
reused unchanged by ``mil predict``, ``mil heatmap`` and the fusion models (:mod:`mil.fusion`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from mil.cohort import Bag, read_table
from mil.io import write_text

logger = logging.getLogger(__name__)

ENCODER_FILE = "covariates.json"
UNSEEN = ("error", "other")


class CovariateError(ValueError):
    """A covariate problem; the message names the column, file, row and value at fault."""


@dataclass
class RawCovariates:
    """Covariate values of a cohort, one row per bag (index: bag id).

    Numeric columns hold floats (NaN: missing), categorical columns strings (None: missing).
    ``where`` says where each bag's values come from, for error messages.
    """

    numeric: list[str]
    categorical: list[str]
    values: pd.DataFrame
    where: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [*self.numeric, *self.categorical]


def configured(cohort_cfg: DictConfig) -> bool:
    """Whether the config names any covariate."""
    c = cohort_cfg.covariates
    return bool(len(c.numeric) or len(c.categorical))


def _column_source(cohort_cfg: DictConfig, names: list[str], context: str) -> dict[str, tuple[pd.DataFrame, str, str]]:
    """For each covariate: (table, its path, its id column); one error lists every missing column."""
    tables: list[tuple[pd.DataFrame, str, str]] = []
    if cohort_cfg.clinical_csv:
        tables.append((read_table(cohort_cfg.clinical_csv, [cohort_cfg.patient_column], "clinical table"),
                       str(cohort_cfg.clinical_csv), cohort_cfg.patient_column))
    tables.append((read_table(cohort_cfg.slide_csv, [cohort_cfg.slide_column], "slide table"),
                   str(cohort_cfg.slide_csv), cohort_cfg.slide_column))
    found, missing = {}, []
    for name in names:
        hit = next((t for t in tables if name in t[0].columns), None)
        if hit is None:
            missing.append(name)
        else:
            found[name] = hit
    if missing:
        where = " or ".join(t[1] for t in tables)
        raise CovariateError(
            f"covariate column(s) {', '.join(map(repr, missing))} not found in {where}{context}; "
            f"add the column(s), or remove them from cohort.covariates"
        )
    return found


def read_covariates(cohort_cfg: DictConfig, bags: list[Bag], context: str = "") -> RawCovariates | None:
    """Read the configured covariates of ``bags`` (None when none are configured).

    Errors (all bad items of a kind at once): a column in neither table; a non-numeric value in a
    numeric covariate (file, row, id and value); a patient whose slides disagree on a value.
    ``context`` is appended to the missing-column message (e.g. which run needs the column).
    """
    if not configured(cohort_cfg):
        return None
    numeric = [str(c) for c in cohort_cfg.covariates.numeric]
    categorical = [str(c) for c in cohort_cfg.covariates.categorical]
    if cohort_cfg.covariates.unseen_category not in UNSEEN:
        raise CovariateError(f"cohort.covariates.unseen_category must be one of {UNSEEN}, "
                             f"got {cohort_cfg.covariates.unseen_category!r}")
    twice = sorted(set(numeric) & set(categorical))
    if twice:
        raise CovariateError(f"covariate(s) {twice} are listed as both numeric and categorical")
    sources = _column_source(cohort_cfg, numeric + categorical, context)
    bad: list[str] = []
    columns: dict[str, list[Any]] = {}
    where: dict[str, str] = {}
    for name in numeric + categorical:
        table, path, id_col = sources[name]
        raw = table[name].astype("string").str.strip().replace("", pd.NA)
        if name in numeric:
            parsed = pd.to_numeric(raw, errors="coerce")
            wrong = raw.notna() & (parsed.isna() | ~np.isfinite(parsed.astype(float).fillna(0)))
            bad += [f"{path} row {i + 2} ({id_col} {table.at[i, id_col]!r}): {name}={raw[i]!r}" for i in raw.index[wrong]]
            values = parsed.astype(float)
        else:
            values = raw.astype(object).where(raw.notna(), None)
        by_id = dict(zip(table[id_col], values, strict=True))
        rows = {k: f"{path} row {i + 2} ({id_col} {k!r})" for i, k in zip(table.index, table[id_col], strict=True)}
        key_of = (lambda b: [b.patient_id]) if id_col == cohort_cfg.patient_column else (lambda b: b.slide_ids)
        out = []
        for bag in bags:
            keys = key_of(bag)
            found = {v for k in keys if (v := by_id.get(k)) is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(found) > 1:
                raise CovariateError(f"{path}: patient {bag.patient_id!r} has slides with different {name} values "
                                     f"{sorted(map(str, found))}; give one value per patient (clinical table)")
            out.append(found.pop() if found else (math.nan if name in numeric else None))
            where.setdefault(bag.bag_id, rows.get(keys[0], f"bag {bag.bag_id!r}"))
        columns[name] = out
    if bad:
        raise CovariateError(
            f"numeric covariate(s) with non-numeric values ({len(bad)}): " + "; ".join(bad[:10])
            + ("; ..." if len(bad) > 10 else "") + "; fix the values, leave them empty (imputed), or list the "
            "column under cohort.covariates.categorical"
        )
    values = pd.DataFrame(columns, index=[b.bag_id for b in bags])
    return RawCovariates(numeric, categorical, values, where)


@dataclass
class CovariateEncoder:
    """Training-fold encoding of covariates: z-scores, one-hot columns and missing indicators.

    Fit with :meth:`fit` on the training bags only; :meth:`transform` gives the float32 matrix
    [n_bags, dim] the fusion models and the covariates-only model read, in the column order of
    :attr:`feature_names`. Saved as JSON (:meth:`save` / :meth:`load`).
    """

    numeric: list[str]
    categorical: list[str]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)
    mode: dict[str, str] = field(default_factory=dict)  # most frequent training category (imputation)
    indicators: list[str] = field(default_factory=list)  # covariates with a missing-value indicator column
    unseen_category: str = "error"
    imputed_in_training: dict[str, int] = field(default_factory=dict)

    @classmethod
    def fit(cls, raw: RawCovariates, bag_ids: list[str], unseen_category: str = "error") -> CovariateEncoder:
        """Statistics of the bags ``bag_ids`` (the training fold); errors when a column has no value there."""
        v = raw.values.loc[bag_ids]
        enc = cls(list(raw.numeric), list(raw.categorical), unseen_category=unseen_category)
        empty = [n for n in raw.names if v[n].isna().all()]
        if empty:
            raise CovariateError(f"covariate(s) {empty} have no value in the {len(bag_ids)} training bags: nothing to learn from")
        for n in raw.numeric:
            x = v[n].to_numpy(float)
            x = x[np.isfinite(x)]
            std = float(x.std())
            enc.mean[n], enc.std[n] = float(x.mean()), std if std > 1e-12 else 1.0
        for n in raw.categorical:
            counts = v[n].dropna().astype(str).value_counts()
            enc.categories[n] = sorted(counts.index.tolist())
            enc.mode[n] = str(counts.sort_index().idxmax())  # ties: the first in sorted order
        enc.imputed_in_training = {n: int(v[n].isna().sum()) for n in raw.names}
        enc.indicators = [n for n in raw.names if enc.imputed_in_training[n] > 0]
        return enc

    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded columns: ``age``, ``stage=II``, ``age_missing``, ..."""
        names = list(self.numeric)
        for n in self.categorical:
            names += [f"{n}={c}" for c in self.categories[n]]
        return names + [f"{n}_missing" for n in self.indicators]

    @property
    def dim(self) -> int:
        return len(self.feature_names)

    def transform(self, raw: RawCovariates, bag_ids: list[str]) -> tuple[np.ndarray, dict[str, int]]:
        """Encoded matrix [len(bag_ids), dim] (float32) and the count of imputed values per covariate.

        Errors: a covariate the encoder was fitted with is absent from ``raw`` (names the column);
        an unseen category with ``unseen_category="error"`` (names every row and value).
        """
        absent = [n for n in [*self.numeric, *self.categorical] if n not in raw.values.columns]
        if absent:
            raise CovariateError(f"the model was trained with covariate(s) {absent}, which this cohort does not provide; "
                                 "add the column(s) to the clinical table")
        v = raw.values.loc[bag_ids]
        parts: list[np.ndarray] = []
        imputed: dict[str, int] = {}
        for n in self.numeric:
            x = v[n].to_numpy(float)
            missing = ~np.isfinite(x)
            imputed[n] = int(missing.sum())
            parts.append(np.where(missing, 0.0, (x - self.mean[n]) / self.std[n])[:, None])
        unseen: list[str] = []
        for n in self.categorical:
            cats = self.categories[n]
            index = {c: i for i, c in enumerate(cats)}
            onehot = np.zeros((len(v), len(cats)))
            col = v[n].tolist()
            imputed[n] = 0
            for r, (bag_id, value) in enumerate(zip(bag_ids, col, strict=True)):
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    imputed[n] += 1
                    onehot[r, index[self.mode[n]]] = 1.0
                elif str(value) in index:
                    onehot[r, index[str(value)]] = 1.0
                elif self.unseen_category == "error":
                    unseen.append(f"{raw.where.get(bag_id, bag_id)}: {n}={value!r}")
                # "other": an all-zero row, the reference level
            parts.append(onehot)
        if unseen:
            known = "; ".join(f"{n}: {self.categories[n]}" for n in self.categorical)
            raise CovariateError(
                f"categor{'ies' if len(unseen) > 1 else 'y'} not seen in training ({len(unseen)}): "
                + "; ".join(unseen[:10]) + ("; ..." if len(unseen) > 10 else "")
                + f". Training categories: {known}. Fix the values, or set cohort.covariates.unseen_category=other"
            )
        for n in self.indicators:
            parts.append(v[n].isna().to_numpy(float)[:, None])
        x = np.concatenate(parts, axis=1) if parts else np.zeros((len(v), 0))
        assert x.shape == (len(bag_ids), self.dim)
        return x.astype(np.float32), imputed

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps({**asdict(self), "feature_names": self.feature_names}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> CovariateEncoder:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the run was trained with covariates and needs it")
        data = json.loads(path.read_text())
        data.pop("feature_names", None)
        return cls(**data)


def encoder_path(weights: str | Path) -> Path:
    """Where the covariate encoder of a model is saved: ``covariates.json`` beside its weights."""
    return Path(weights).with_name(ENCODER_FILE)


def encode_split(
    enc: CovariateEncoder, raw: RawCovariates, bags: list[Bag], what: str
) -> tuple[np.ndarray, dict[str, int]]:
    """``enc.transform`` of ``bags``; the imputed values per covariate of this split are logged and returned."""
    x, imputed = enc.transform(raw, [b.bag_id for b in bags])
    if any(imputed.values()):
        logger.info("%s: imputed missing covariates %s", what, ", ".join(f"{k}: {v}" for k, v in imputed.items() if v))
    return x, imputed


@dataclass
class FoldCovariates:
    """A fold's encoder and the encoded covariates of its training and validation bags."""

    encoder: CovariateEncoder
    train: np.ndarray  # [n_train, dim]
    val: np.ndarray  # [n_val, dim]
    imputed: dict[str, dict[str, int]]  # split -> covariate -> number of imputed values

    def save(self, weights: str | Path) -> None:
        """Write the encoder beside ``weights`` (see :func:`encoder_path`)."""
        self.encoder.save(encoder_path(weights))


def fit_fold(
    raw: RawCovariates, train_bags: list[Bag], val_bags: list[Bag], unseen_category: str, what: str
) -> FoldCovariates:
    """Fit the encoder on ``train_bags`` only and encode both splits."""
    enc = CovariateEncoder.fit(raw, [b.bag_id for b in train_bags], unseen_category)
    x_train, imp_train = encode_split(enc, raw, train_bags, f"{what}, training")
    x_val, imp_val = encode_split(enc, raw, val_bags, f"{what}, validation")
    return FoldCovariates(enc, x_train, x_val, {"train": imp_train, "val": imp_val})


def model_covariates(model: Any, raw: RawCovariates | None, bags: list[Bag], what: str) -> np.ndarray | None:
    """Encoded covariates [len(bags), dim] for a loaded run model (None when it was trained without).

    ``model.covariate_encoder`` is set by :func:`mil.crossval.load_run_model`. A model trained with
    covariates is an error when ``raw`` (the cohort's covariates) is None or lacks one of them.
    """
    enc = getattr(model, "covariate_encoder", None)
    if enc is None:
        return None
    if raw is None:
        raise CovariateError(
            f"{what} was trained with covariates {[*enc.numeric, *enc.categorical]}, but none are given; "
            "it cannot predict without them: keep cohort.covariates as in the run and provide the columns"
        )
    return encode_split(enc, raw, bags, what)[0]
