"""Lightning training of an aggregator on bags: the LightningModule, ``fit`` and prediction.

The network is a plain ``nn.Module`` from :mod:`mil.models`, passed in; the task
(:mod:`mil.tasks`) supplies the loss, the validation metrics and the meaning of the outputs;
this module owns the optimiser, early stopping and the choice of the best epoch on the
validation split.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from omegaconf import DictConfig
from torch import nn

from mil.cohort import Bag
from mil.data import BagDataset, make_loader
from mil.losses import AUX_LOSSES
from mil.tasks import Task

logger = logging.getLogger(__name__)


class MILModule(L.LightningModule):
    """Trains a MIL aggregator on a task's loss (+ the model's auxiliary loss where it applies)."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        loss: nn.Module,
        lr: float = 2e-4,
        weight_decay: float = 1e-2,
        scheduler: str = "cosine",
        max_epochs: int = 40,
        aux_loss_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "task", "loss"])
        self.model, self.task, self.loss = model, task, loss
        aux_name = getattr(model, "aux_loss", None)
        if aux_name and not task.supports_aux_loss:
            logger.info("the auxiliary loss %r of the model applies to classification only: not used", aux_name)
            aux_name = None
        self.aux_loss = AUX_LOSSES.get(aux_name) if aux_name else None
        self.aux_weight = aux_loss_weight if aux_loss_weight is not None else getattr(model, "aux_loss_weight", 1.0)
        self.val_metrics = task.make_metrics()

    def forward(self, features: torch.Tensor, mask: torch.Tensor):
        return self.model(features.float(), mask)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The task loss (+ auxiliary loss in training) and the float logits of a batch."""
        out = self(batch["features"], batch["mask"])
        logits, y = out.logits.float(), batch["target"]
        loss = self.loss(logits, y)
        if self.aux_loss is not None and self.training:
            aux = self.aux_loss(out, y.long(), batch["mask"], **getattr(self.model, "aux_loss_kwargs", {}))
            loss = loss + self.aux_weight * aux
        return loss, logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self.compute_loss(batch)
        self.val_metrics.update(logits, batch["target"])
        if not self.task.epoch_loss:
            self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(logits), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        if self.task.epoch_loss:  # e.g. Cox: risk sets span the whole validation split
            self.log("val_loss", values.pop("loss"), prog_bar=True)
        self.log_dict({f"val_{k}": v for k, v in values.items()}, prog_bar=False)

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
    task: Task,
    train_bags: list[Bag],
    train_targets: torch.Tensor,
    val_bags: list[Bag],
    val_targets: torch.Tensor,
    out_dir: Path,
    seed: int,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` on the training bags for ``task``, choosing the epoch on the validation bags.

    Returns the network with the best epoch's weights and a summary of the run.
    """
    t = cfg.train
    modes = task.monitor_modes
    if t.monitor not in modes:
        raise ValueError(f"train.monitor must be one of {sorted(modes)} for task.type={task.name}, got {t.monitor!r}")
    L.seed_everything(seed, workers=True, verbose=False)
    module = MILModule(
        model,
        task,
        task.make_loss(train_targets),
        lr=t.lr,
        weight_decay=t.weight_decay,
        scheduler=t.scheduler,
        max_epochs=t.max_epochs,
        aux_loss_weight=t.aux_loss_weight,
    )
    mode = modes[t.monitor]
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
