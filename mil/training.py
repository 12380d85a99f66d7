"""Lightning training of an aggregator on bags: the LightningModule and a ``fit`` helper.

The network is a plain ``nn.Module`` from :mod:`mil.models`, passed in; this module owns the
loss, optimiser, metrics, early stopping and the choice of the best epoch on the
validation split.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping
from omegaconf import DictConfig
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassAveragePrecision,
    MulticlassF1Score,
)

from mil.cohort import Bag
from mil.data import BagDataset, make_loader
from mil.losses import AUX_LOSSES

logger = logging.getLogger(__name__)

MONITOR_MODES = {"val_loss": "min", "val_auroc": "max", "val_ap": "max", "val_balanced_accuracy": "max", "val_f1": "max"}


def _metrics(n_classes: int) -> MetricCollection:
    if n_classes == 2:
        return MetricCollection(
            {
                "auroc": BinaryAUROC(),
                "ap": BinaryAveragePrecision(),
                "balanced_accuracy": MulticlassAccuracy(num_classes=2, average="macro"),
                "f1": BinaryF1Score(),
            }
        )
    return MetricCollection(
        {
            "auroc": MulticlassAUROC(num_classes=n_classes),
            "ap": MulticlassAveragePrecision(num_classes=n_classes),
            "balanced_accuracy": MulticlassAccuracy(num_classes=n_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes=n_classes, average="macro"),
        }
    )


class MILModule(L.LightningModule):
    """Classification training of a MIL aggregator with cross-entropy (+ its auxiliary loss)."""

    def __init__(
        self,
        model: nn.Module,
        n_classes: int,
        lr: float = 2e-4,
        weight_decay: float = 1e-2,
        class_weights: list[float] | None = None,
        scheduler: str = "cosine",
        max_epochs: int = 40,
        aux_loss_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.register_buffer(
            "class_weights", torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        )
        aux_name = getattr(model, "aux_loss", None)
        self.aux_loss = AUX_LOSSES.get(aux_name) if aux_name else None
        self.aux_weight = aux_loss_weight if aux_loss_weight is not None else getattr(model, "aux_loss_weight", 1.0)
        self.val_metrics = _metrics(n_classes).clone(prefix="val_")

    def forward(self, features: torch.Tensor, mask: torch.Tensor):
        return self.model(features.float(), mask)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self(batch["features"], batch["mask"])
        y = batch["target"].long()
        loss = F.cross_entropy(out.logits.float(), y, weight=self.class_weights)
        if self.aux_loss is not None and self.training:
            aux = self.aux_loss(out, y, batch["mask"], **getattr(self.model, "aux_loss_kwargs", {}))
            loss = loss + self.aux_weight * aux
        return loss, out.logits.float()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._step(batch)
        probs = logits.softmax(-1)
        y = batch["target"].long()
        self.val_metrics.update(probs[:, 1] if self.hparams.n_classes == 2 else probs, y)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=False)
        self.val_metrics.reset()

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.scheduler == "none":
            return opt
        if self.hparams.scheduler != "cosine":
            raise ValueError(f"train.scheduler must be 'cosine' or 'none', got {self.hparams.scheduler!r}")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.hparams.max_epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


class BestWeights(Callback):
    """Keep a copy of the network's weights from the epoch with the best monitored value."""

    def __init__(self, monitor: str, mode: str) -> None:
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch = -1
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: MILModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_epoch = value, trainer.current_epoch
            self.state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}


def class_weights(labels: torch.Tensor, n_classes: int) -> list[float]:
    """Inverse-frequency weights, normalised to mean 1."""
    counts = torch.bincount(labels, minlength=n_classes).float().clamp(min=1)
    w = counts.sum() / (n_classes * counts)
    return w.tolist()


def _logger(cfg: DictConfig, out_dir: Path) -> Any:
    kind = cfg.trainer.logger
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(out_dir, name="logs", version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(out_dir, name="logs", version="")
    if kind == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(experiment_name=Path(cfg.output_dir).name, save_dir=str(out_dir / "mlruns"))
    raise ValueError(f"trainer.logger must be csv, tensorboard, mlflow or none, got {kind!r}")


def fit(
    cfg: DictConfig,
    model: nn.Module,
    train_bags: list[Bag],
    train_targets: torch.Tensor,
    val_bags: list[Bag],
    val_targets: torch.Tensor,
    n_classes: int,
    out_dir: Path,
    seed: int,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` on the training bags, choosing the epoch on the validation bags.

    Returns the network with the best epoch's weights and a summary of the run.
    """
    t = cfg.train
    if t.monitor not in MONITOR_MODES:
        raise ValueError(f"train.monitor must be one of {sorted(MONITOR_MODES)}, got {t.monitor!r}")
    L.seed_everything(seed, workers=True, verbose=False)
    module = MILModule(
        model,
        n_classes=n_classes,
        lr=t.lr,
        weight_decay=t.weight_decay,
        class_weights=class_weights(train_targets, n_classes) if t.class_weighted else None,
        scheduler=t.scheduler,
        max_epochs=t.max_epochs,
        aux_loss_weight=t.aux_loss_weight,
    )
    mode = MONITOR_MODES[t.monitor]
    best = BestWeights(t.monitor, mode)
    callbacks = [best, EarlyStopping(t.monitor, mode=mode, patience=t.patience, check_finite=False)]
    trainer = L.Trainer(
        max_epochs=t.max_epochs,
        min_epochs=min(t.min_epochs, t.max_epochs),
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        precision=t.precision,
        deterministic=cfg.trainer.deterministic,
        logger=_logger(cfg, out_dir),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=str(out_dir),
    )
    train_loader = make_loader(
        BagDataset(train_bags, train_targets, t.bag_size), t.batch_size, shuffle=True, num_workers=t.num_workers
    )
    val_loader = make_loader(BagDataset(val_bags, val_targets), t.eval_batch_size, shuffle=False, num_workers=t.num_workers)
    trainer.fit(module, train_loader, val_loader)
    if best.state is None:
        raise RuntimeError("training produced no validation result; check the validation split is not empty")
    trained = copy.deepcopy(model).cpu()
    trained.load_state_dict(best.state)
    summary = {"best_epoch": best.best_epoch, f"best_{t.monitor}": best.best, "epochs_run": trainer.current_epoch}
    logger.info("best epoch %d (%s=%.4f) of %d", best.best_epoch, t.monitor, best.best, trainer.current_epoch)
    return trained, summary
