"""Applying trained aggregators to bags, and saving / loading their weights (safetensors)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mil.cohort import Bag
from mil.data import BagDataset, make_loader
from mil.io import atomic_path


def save_weights(model: nn.Module, path: str | Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights {path} do not exist")
    model.load_state_dict(load_file(str(path)))
    return model


def resolve_device(accelerator: str = "auto") -> torch.device:
    if accelerator in ("auto", "gpu", "cuda"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(accelerator)


@torch.inference_mode()
def predict_outputs(
    model: nn.Module,
    bags: list[Bag],
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    precision: str = "32-true",
    num_workers: int = 0,
    covariates: torch.Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """Raw outputs [n_bags, n_outputs] (float32) of full bags, in the order of ``bags``.

    ``covariates`` [n_bags, C]: the bags' encoded clinical covariates, for a model that fuses them.

    Tasks turn them into prediction columns (:meth:`mil.tasks.Task.predictions`).
    """
    device = torch.device(device)
    model = model.to(device).eval()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16") else contextlib.nullcontext()
    )
    if covariates is not None:
        covariates = torch.as_tensor(covariates, dtype=torch.float32)
    loader = make_loader(BagDataset(bags, covariates=covariates), batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for batch in loader:
        extra = {"covariates": batch["covariates"].to(device)} if "covariates" in batch else {}
        with autocast:
            logits = model(batch["features"].to(device).float(), batch["mask"].to(device), **extra).logits
        out.append(logits.float().cpu())
    return torch.cat(out).numpy()


def predict_bags(model: nn.Module, bags: list[Bag], *args, **kwargs) -> np.ndarray:
    """Softmax probabilities [n_bags, C] of a classifier (arguments as :func:`predict_outputs`)."""
    return torch.from_numpy(predict_outputs(model, bags, *args, **kwargs)).softmax(-1).numpy()
