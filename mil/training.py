"""Lightning training of an aggregator on bags: the LightningModule, ``fit`` and prediction.

The network is a plain ``nn.Module`` from :mod:`mil.models`, passed in; the task
(:mod:`mil.tasks`) supplies the loss, the validation metrics and the meaning of the outputs;
this module owns the optimiser, early stopping and the choice of the best epoch on the
validation split.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import nn
from torchmetrics.aggregation import MeanMetric

from mil.cohort import Bag
from mil.data import BagDataset, make_loader
from mil.losses import AUX_LOSSES
from mil.models.base import parameter_groups
from mil.progress import EpochLines, quiet_lightning, show_progress_bar
from mil.tasks import Task

logger = logging.getLogger(__name__)


OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("constant", "cosine", "none")
SELECTIONS = ("best", "last")  # train.selection also takes "auto": see resolve_selection


class MILModule(L.LightningModule):
    """Trains a MIL aggregator on a task's loss (+ the model's auxiliary loss where it applies).

    The learning rate warms up linearly over ``warmup_steps`` optimiser steps, then stays
    constant (``scheduler="constant"``) or follows a cosine to ``min_lr_ratio * lr`` at the last
    step (``"cosine"``); ``"none"`` is a constant rate without warm-up. The validation loss is
    the mean over every validation bag (a ``MeanMetric`` weighted by batch size, so it does not
    depend on ``eval_batch_size`` and synchronises across DDP processes).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        loss: nn.Module,
        lr: float = 2e-4,
        weight_decay: float = 1e-2,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        scheduler: str = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        aux_loss_weight: float | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"train.scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        self.save_hyperparameters(ignore=["model", "task", "loss"])
        self.model, self.task, self.loss = model, task, loss
        aux_name = getattr(model, "aux_loss", None)
        if aux_name and not task.supports_aux_loss:
            logger.info("the auxiliary loss %r of the model applies to classification only: not used", aux_name)
            aux_name = None
        self.aux_loss = AUX_LOSSES.get(aux_name) if aux_name else None
        self.aux_weight = aux_loss_weight if aux_loss_weight is not None else getattr(model, "aux_loss_weight", 1.0)
        self.val_metrics = task.make_metrics()
        self.val_loss = MeanMetric()
        self._epoch_loss: torch.Tensor | float = 0.0  # summed training loss of this epoch's bags
        self._epoch_bags = 0

    def forward(self, features: torch.Tensor, mask: torch.Tensor, covariates: torch.Tensor | None = None):
        if covariates is None:
            return self.model(features.float(), mask)
        return self.model(features.float(), mask, covariates=covariates.float())

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The task loss (+ auxiliary loss in training) and the float logits of a batch."""
        out = self(batch["features"], batch["mask"], batch.get("covariates"))
        logits, y = out.logits.float(), batch["target"]
        loss = self.loss(logits, y)
        if self.aux_loss is not None and self.training:
            aux = self.aux_loss(out, y.long(), batch["mask"], **getattr(self.model, "aux_loss_kwargs", {}))
            loss = loss + self.aux_weight * aux
        return loss, logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        # The epoch's mean loss, logged once at its last step: Lightning's self.log per step was
        # the largest share of its per-step Python work (a cProfile of 304 steps: 1.39 M -> 0.83 M calls).
        n = len(batch["target"])
        self._epoch_loss = (self._epoch_loss if batch_idx else 0.0) + loss.detach() * n
        self._epoch_bags = (self._epoch_bags if batch_idx else 0) + n
        if batch_idx == self.trainer.num_training_batches - 1:
            self.log("train_loss", self._epoch_loss / self._epoch_bags, on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=self._epoch_bags)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits = self.compute_loss(batch)
        self.val_metrics.update(logits, batch["target"])
        if not self.task.epoch_loss:
            self.val_loss.update(loss.detach(), weight=len(logits))
        return logits.detach()  # [B, n_outputs], for ValidationRecord

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        if self.task.epoch_loss:  # e.g. Cox: risk sets span the whole validation split
            val_loss = values.pop("loss")
        else:
            val_loss = self.val_loss.compute()
            self.val_loss.reset()
        self.log("val_loss", val_loss, prog_bar=True)
        self.log_dict({f"val_{k}": v for k, v in values.items()}, prog_bar=False)

    def configure_optimizers(self) -> Any:
        h = self.hparams
        # Modules may learn at a multiple of train.lr (an attention network's lr_scale, see its model).
        groups = parameter_groups(self.model, lr=h.lr)
        params = [p for g in groups for p in g["params"]]
        # One fused kernel per step instead of a loop over parameters: at batch 1 the optimiser
        # step is a sizeable share of a CPU training step.
        fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) else {}
        if h.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=h.lr, weight_decay=h.weight_decay, **fused)
        elif h.optimizer == "adam":  # L2 penalty in the gradient, as in Ilse et al. 2018
            opt = torch.optim.Adam(groups, lr=h.lr, weight_decay=h.weight_decay, **fused)
        else:
            opt = torch.optim.SGD(groups, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay, **fused)
        if h.scheduler == "none":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(h.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if h.scheduler == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class BestWeights(Callback):
    """Keep the network's weights from the epoch with the best smoothed validation value.

    The monitored value is averaged over the last ``window`` validation epochs (a trailing
    mean: tiny validation splits make single epochs noisy, and AUROC on a dozen bags moves in
    big steps); an epoch is eligible once its window is full and ``start_epoch`` is reached,
    so a lucky first epoch is never kept. Ties go to the lower smoothed validation loss. A
    window with a non-finite value is never selected. ``selection="last"`` keeps the final
    weights instead. With ``patience`` set, training stops after that many epochs without a
    better smoothed value, but not before ``min_steps`` optimiser steps.
    """

    def __init__(
        self,
        monitor: str,
        mode: str,
        window: int = 1,
        start_epoch: int = 0,
        selection: str = "best",
        patience: int | None = None,
        min_steps: int = 0,
    ) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"train.selection must be one of {list(SELECTIONS)}, got {selection!r}")
        self.monitor, self.mode, self.window = monitor, mode, max(1, window)
        self.start_epoch, self.selection = start_epoch, selection
        self.patience, self.min_steps = patience, min_steps
        self.history: list[dict[str, float]] = []
        self.best: float | None = None  # smoothed monitor at the kept epoch
        self.best_epoch = -1
        self.state: dict[str, torch.Tensor] | None = None

    def _keep(self, epoch: int, pl_module: L.LightningModule, value: float | None) -> None:
        self.best, self.best_epoch = value, epoch
        self.state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        value = float(metrics[self.monitor]) if self.monitor in metrics else math.nan
        loss = float(metrics["val_loss"]) if "val_loss" in metrics else math.nan
        epoch = trainer.current_epoch
        self.history.append({"epoch": epoch, self.monitor: value, "val_loss": loss})
        if self.selection == "last":
            self._keep(epoch, pl_module, value)
            return
        if len(self.history) < self.window or epoch < self.start_epoch:
            return
        chosen = best_smoothed_epoch(self.history, self.monitor, self.mode, self.window, self.start_epoch)
        if chosen is not None and chosen[0] == epoch:  # this epoch is the best so far
            self._keep(epoch, pl_module, chosen[1])
        elif (
            self.patience is not None
            and self.best_epoch >= 0
            and epoch - self.best_epoch >= self.patience
            and trainer.global_step >= self.min_steps
        ):
            logger.info("stopping: no better smoothed %s for %d epochs", self.monitor, self.patience)
            trainer.should_stop = True


class ValidationRecord(Callback):
    """Every validation epoch's logged values and raw outputs, for choosing an epoch over several fits.

    ``epochs[i]``: ``{"epoch": e, "val_loss": ..., "val_auroc": ...}`` (every logged ``val_*``);
    ``outputs[i]``: the model's raw outputs [n_val, n_outputs] (float32) of that epoch, in the
    validation loader's order (the order of the validation bags). One process only (no DDP).
    """

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.outputs: list[np.ndarray] = []
        self._batches: list[torch.Tensor] = []

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batches.append(outputs.float().cpu())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        self.epochs.append({"epoch": trainer.current_epoch, **values})
        self.outputs.append(torch.cat(self._batches).numpy())
        self._batches = []


def best_smoothed_epoch(
    curve: list[dict[str, float]], monitor: str, mode: str, window: int, start_epoch: int = 0,
) -> tuple[int, float] | None:
    """The epoch of ``curve`` with the best trailing mean of ``monitor`` over ``window`` epochs.

    ``curve``: one dict per validation epoch, in order, with ``epoch``, ``monitor`` and
    ``val_loss``. The rule of :class:`BestWeights` (which applies it after each epoch): an epoch is eligible once its window is
    full and ``start_epoch`` is reached; windows with a non-finite value are skipped; ties go to
    the lower smoothed ``val_loss``, then to the earlier epoch. Returns ``(epoch, smoothed value)``,
    or None when no epoch is eligible.
    """
    window = max(1, window)
    sign = 1.0 if mode == "max" else -1.0
    best: tuple[float, float, int, float] | None = None  # (-sign * value, loss, epoch, value): the minimum wins
    for i in range(window - 1, len(curve)):
        recent = curve[i - window + 1 : i + 1]
        values = [h[monitor] for h in recent]
        if curve[i]["epoch"] < start_epoch or not all(math.isfinite(v) for v in values):
            continue
        value = sum(values) / window
        losses = [h.get("val_loss", math.nan) for h in recent]
        loss = sum(losses) / window if all(math.isfinite(v) for v in losses) else math.inf
        key = (round(-sign * value, 9), loss, int(curve[i]["epoch"]), value)
        if best is None or key < best:
            best = key
    return None if best is None else (best[2], best[3])


def resolve_selection(selection: str, val_targets: torch.Tensor, task: Task, min_val_bags: int) -> str:
    """``"auto"``: select an epoch (``"best"``) only when the validation split can rank epochs.

    Below ``min_val_bags`` validation bags (for classification: of the smallest class), a
    validation metric moves in steps as large as the differences between epochs, and choosing
    on it kept barely trained models on small cohorts; the final weights of the fixed budget
    (``"last"``) are then kept instead. Other values pass through.
    """
    if selection != "auto":
        return selection
    y = val_targets
    if task.name == "classification" and y.ndim == 1:
        labelled = y[y >= 0].long()
        smallest = int(torch.bincount(labelled).min()) if len(labelled) else 0
        return "best" if smallest >= min_val_bags else "last"
    return "best" if len(y) >= 4 * min_val_bags else "last"


def first_eligible_epoch(train_cfg: DictConfig, epochs: int, steps_per_epoch: int) -> int:
    """The first epoch that may be kept: the one in which the warm-up ends (``train.warmup_steps``,
    at most half the budget), and at the latest the last of ``epochs``."""
    warmup = min(train_cfg.warmup_steps, epochs * steps_per_epoch // 2)
    return min(math.ceil(warmup / steps_per_epoch), epochs - 1)


def budget_epochs(n_train: int, batch_size: int, max_epochs: int, min_steps: int, world_size: int = 1) -> int:
    """Epochs to train: ``max_epochs``, raised so that at least ``min_steps`` optimiser steps run.

    Small cohorts give few steps per epoch (20 bags at batch size 1: 20 steps); sparse signals
    are found after a number of optimiser steps, not epochs, so the budget is counted in both.
    """
    steps_per_epoch = max(1, math.ceil(n_train / (batch_size * world_size)))
    return max(max_epochs, math.ceil(min_steps / steps_per_epoch))


def _module(cfg: DictConfig, model: nn.Module, task: Task, train_targets: torch.Tensor) -> MILModule:
    """The LightningModule of ``model`` with the recipe of ``cfg.train``."""
    t = cfg.train
    return MILModule(
        model,
        task,
        task.make_loss(train_targets),
        lr=t.lr,
        weight_decay=t.weight_decay,
        optimizer=t.optimizer,
        momentum=t.momentum,
        scheduler=t.scheduler,
        warmup_steps=t.warmup_steps,
        min_lr_ratio=t.min_lr_ratio,
        aux_loss_weight=t.aux_loss_weight,
    )


def _trainer(
    cfg: DictConfig, out_dir: Path, epochs: int, callbacks: list[Callback], validate: bool = True, validate_every: int = 1,
    name: str | None = None,
) -> L.Trainer:
    """A Lightning Trainer for ``epochs`` epochs, validating every ``validate_every`` epochs (never: ``validate=False``).

    ``name`` labels the per-epoch log lines (default: the folder's name).
    """
    # Progress: bars on a terminal, else one log line per epoch (mil/progress.py); no Lightning tips or banners.
    progress_bar = show_progress_bar(cfg.trainer.enable_progress_bar)
    quiet_lightning()
    return L.Trainer(
        max_epochs=epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        precision=cfg.train.precision,
        deterministic=cfg.trainer.deterministic,
        logger=_logger(cfg, out_dir),
        callbacks=callbacks + ([] if progress_bar else [EpochLines(name or out_dir.name)]),
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        limit_val_batches=None if validate else 0,
        check_val_every_n_epoch=validate_every,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=str(out_dir),
    )


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
    train_covariates: torch.Tensor | None = None,
    val_covariates: torch.Tensor | None = None,
    fixed_epochs: int | None = None,
    name: str | None = None,
    callbacks: Sequence[Callback] = (),
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` on the training bags for ``task``, choosing the epoch on the validation bags.

    ``*_covariates`` [n_bags, C]: encoded clinical covariates, for a model that fuses them.
    ``fixed_epochs``: train exactly this many epochs and keep the final weights, with no
    validation at all (the refit of ``train.refit``: the epoch was chosen before, and the
    validation bags are among the training bags); ``val_*`` are then ignored. ``name`` labels
    the progress lines, e.g. "fold_0 (refit)" (default: the name of ``out_dir``). ``callbacks``:
    more Lightning callbacks for the trainer (e.g. a :class:`ValidationRecord`).
    Returns the network with the best epoch's weights and a summary of the run.
    """
    if fixed_epochs is not None:
        return _fit_fixed(cfg, model, task, train_bags, train_targets, out_dir, seed, train_covariates, fixed_epochs, name)
    t = cfg.train
    modes = task.monitor_modes
    monitor = task.default_monitor if t.monitor == "auto" else t.monitor
    if monitor not in modes:
        raise ValueError(f"train.monitor must be 'auto' or one of {sorted(modes)} for task.type={task.name}, got {monitor!r}")
    L.seed_everything(seed, workers=True, verbose=False)
    world = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    epochs = budget_epochs(len(train_bags), t.batch_size, t.max_epochs, t.min_steps, world)
    steps_per_epoch = math.ceil(len(train_bags) / (t.batch_size * world))
    module = _module(cfg, model, task, train_targets)
    mode = modes[monitor]
    selection = resolve_selection(t.selection, val_targets, task, t.min_val_bags)
    best = BestWeights(
        monitor, mode, window=min(t.monitor_window, epochs), start_epoch=first_eligible_epoch(t, epochs, steps_per_epoch),
        selection=selection,
        patience=t.patience, min_steps=max(t.min_steps, t.min_epochs * steps_per_epoch),
    )
    # Too few validation bags to rank epochs: validate once, after the last epoch (threshold, warnings).
    trainer = _trainer(cfg, out_dir, epochs, [best, *callbacks], validate_every=epochs if selection == "last" else 1,
                       name=name)
    train_loader = make_loader(
        BagDataset(train_bags, train_targets, t.bag_size, covariates=train_covariates), t.batch_size, shuffle=True,
        num_workers=t.num_workers,
    )
    val_loader = make_loader(BagDataset(val_bags, val_targets, covariates=val_covariates), t.eval_batch_size, shuffle=False,
                             num_workers=t.num_workers,
                             shard_across_processes=True)  # under DDP each validation bag counts once (issue 11)
    logger.info("training %d epochs of %d steps (%d bags, batch size %d); %s", epochs, steps_per_epoch,
                len(train_bags), t.batch_size,
                f"keeping the epoch with the best smoothed {monitor}" if selection == "best"
                else f"keeping the last epoch ({len(val_bags)} validation bags: too few to rank epochs; "
                     "validating once, after it)")
    trainer.fit(module, train_loader, val_loader)
    if not best.history:
        raise RuntimeError("training produced no validation result; check the validation split is not empty")
    trained = copy.deepcopy(model).cpu()
    notes: list[str] = []
    if best.state is None:
        notes.append(f"no finite smoothed {monitor} in {len(best.history)} validation epochs: kept the last epoch")
        kept_epoch = best.history[-1]["epoch"]
    else:
        trained.load_state_dict(best.state)
        kept_epoch = best.best_epoch
    epochs_run = trainer.current_epoch
    at_kept = next(h for h in best.history if h["epoch"] == kept_epoch)
    notes += training_warnings(kept_epoch, epochs_run, at_kept, trainer.callback_metrics, best.history)
    for w in notes:
        logger.warning("%s", w)
    summary = {
        "best_epoch": kept_epoch,
        "monitor": monitor,
        f"best_{monitor}": at_kept[monitor],
        f"smoothed_{monitor}": best.best,
        "selection": selection,
        "epochs_run": epochs_run,
        "steps_run": int(trainer.global_step),
        "warnings": notes,
    }
    # Epochs count from 0 here and in summary.json (Lightning's current_epoch); the progress lines count from 1.
    logger.info("kept epoch %d of 0-%d (%s=%.4f; counted from 0, so the progress line 'epoch %d/%d')", kept_epoch,
                epochs_run - 1, monitor, at_kept[monitor], kept_epoch + 1, epochs_run)
    return trained, summary


def _fit_fixed(
    cfg: DictConfig, model: nn.Module, task: Task, train_bags: list[Bag], train_targets: torch.Tensor, out_dir: Path,
    seed: int, train_covariates: torch.Tensor | None, epochs: int, name: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`fit` for a fixed number of epochs without validation; the final weights are kept."""
    if epochs < 1:
        raise ValueError(f"a refit needs at least one epoch, got {epochs}")
    t = cfg.train
    L.seed_everything(seed, workers=True, verbose=False)
    world = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    module = _module(cfg, model, task, train_targets)
    trainer = _trainer(cfg, out_dir, epochs, [], validate=False, name=name)
    loader = make_loader(BagDataset(train_bags, train_targets, t.bag_size, covariates=train_covariates), t.batch_size,
                         shuffle=True, num_workers=t.num_workers)
    steps_per_epoch = math.ceil(len(train_bags) / (t.batch_size * world))
    logger.info("refit: training %d epochs of %d steps on %d bags, keeping the final weights", epochs,
                steps_per_epoch, len(train_bags))
    with warnings.catch_warnings():  # validation is left out on purpose
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        trainer.fit(module, loader)
    return copy.deepcopy(model).cpu(), {"epochs_run": trainer.current_epoch, "steps_run": int(trainer.global_step),
                                        "n_bags": len(train_bags)}


def training_warnings(
    kept_epoch: int, epochs_run: int, at_kept: dict[str, float], final_metrics: dict[str, Any],
    history: list[dict[str, float]],
) -> list[str]:
    """Signs that a fold's kept model learnt little: an early epoch, or validation AUROC at chance.

    ``history`` holds one dict per validation epoch (``epoch``, the monitor, ``val_loss``).
    """
    out = []
    if epochs_run >= 10 and kept_epoch < max(2, epochs_run // 10):
        out.append(f"kept epoch {kept_epoch} of {epochs_run}: a model from the first epochs (barely trained)")
    auroc = at_kept.get("val_auroc")
    if auroc is None and "val_auroc" in final_metrics:
        auroc = float(final_metrics["val_auroc"])
    if auroc is not None and math.isfinite(auroc) and auroc <= 0.5:
        out.append(f"validation AUROC {auroc:.3f} at the kept epoch: not above chance")
    return out
