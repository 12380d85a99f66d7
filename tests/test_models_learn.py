"""Every registered aggregator learns: a tiny planted cohort, a few seconds per model.

A model whose forward pass still runs but no longer learns (a detached branch, an argmax
that blocks every gradient, a loss on the wrong class) passes the contract tests in
``test_models.py``; it fails here, whichever model of the registry it is.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from mil.bags import read_features
from mil.losses import AUX_LOSSES
from mil.models import MODELS, create_model

N_TRAIN, N_TEST = 48, 32


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Train and test bags ([n, 16] float32) with labels, from one synthetic witness cohort."""
    from mil.synthetic import make_synthetic_cohort

    cohort = make_synthetic_cohort(
        tmp_path_factory.mktemp("learn"), N_TRAIN + N_TEST, slides_per_patient=(1, 1), tiles_per_slide=(24, 48),
        dim=16, positive_fraction=0.5, signal_fraction=0.2, strength=5.0, seed=11,
    )
    clinical = pd.read_csv(cohort.clinical_csv)
    slides = pd.read_csv(cohort.slide_csv).set_index("patient_id")["slide_id"]
    bags = [torch.from_numpy(read_features(cohort.features_dir / f"{slides[p]}.h5").astype(np.float32))
            for p in clinical["patient_id"]]
    labels = torch.tensor((clinical["MSI"] == "MSI-H").to_numpy(), dtype=torch.long)
    return bags[:N_TRAIN], labels[:N_TRAIN], bags[N_TRAIN:], labels[N_TRAIN:]


def train_briefly(name: str, bags: list[torch.Tensor], labels: torch.Tensor, epochs: int = 3) -> torch.nn.Module:
    """Batch-1 AdamW with the model's own auxiliary loss, as the trainer combines them."""
    torch.manual_seed(0)
    model = create_model(name, bags[0].shape[1], 2, hidden_dim=32)
    lr = 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    aux = AUX_LOSSES.get(model.aux_loss) if getattr(model, "aux_loss", None) else None
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(bags)).tolist():
            x, y = bags[i][None], labels[i : i + 1]
            mask = torch.ones(x.shape[:2], dtype=torch.bool)
            out = model(x, mask)
            loss = F.cross_entropy(out.logits, y)
            if aux is not None:
                loss = loss + model.aux_loss_weight * aux(out, y, mask, **model.aux_loss_kwargs)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_learns_a_planted_cohort(name: str, planted) -> None:
    train_bags, train_y, test_bags, test_y = planted
    model = train_briefly(name, train_bags, train_y)
    with torch.no_grad():
        scores = torch.stack([model(x[None]).logits.softmax(-1)[0, 1] for x in test_bags])
    auroc = float(binary_auroc(scores, test_y))
    assert auroc >= 0.85, f"{name}: held-out AUROC {auroc:.3f} after brief training on a planted cohort"
