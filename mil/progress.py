"""Training progress that reads well in a file: one log line per epoch when output is not a terminal.

On a terminal Lightning's progress bars stay (``trainer.enable_progress_bar: auto``); under
SLURM, nohup or CI, where bars turn into hundreds of kilobytes of carriage returns,
:class:`EpochLines` logs one line per epoch instead (epoch, training loss, validation metrics,
elapsed time). :func:`quiet_lightning` keeps Lightning's tips, accelerator banners and
warnings about our own loader settings out of the Python API's output.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

logger = logging.getLogger(__name__)

# The command line's log lines (also used by processes it spawns): "12:00:01 INFO mil.crossval: ..."
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"

# Lightning messages that are about our settings, not the user's: e.g. tiny MIL loaders need no workers.
_NOT_THE_USERS_BUSINESS = (
    r".*does not have many workers.*",
    r".*num_workers.*",
    r".*LeafSpec.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
)


def show_progress_bar(setting: Any) -> bool:
    """``trainer.enable_progress_bar``: True / False, or ``"auto"`` / None = bars only on a terminal."""
    if setting is None or (isinstance(setting, str) and setting.lower() == "auto"):
        return sys.stdout.isatty()
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"trainer.enable_progress_bar must be true, false or auto, got {setting!r}")


def quiet_lightning() -> None:
    """Silence Lightning's tips and GPU/TPU banners (INFO logs) and warnings about loader settings."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if log.level == logging.NOTSET or log.level < logging.WARNING:
            log.setLevel(logging.WARNING)
    for pattern in _NOT_THE_USERS_BUSINESS:
        warnings.filterwarnings("ignore", message=pattern)


def _fmt(value: Any) -> str:
    v = float(value)
    return f"{v:.4g}"


class EpochLines(Callback):
    """Log one line per training epoch: ``epoch 3/40: train_loss 0.512, val_loss 0.43, val_auroc 0.91 (2.1 s)``.

    ``label`` (e.g. the fold name) starts each line. Only the main process logs.
    """

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        names = sorted(metrics, key=lambda k: (not k.startswith("train"), k != "val_loss", k))
        values = ", ".join(f"{k} {_fmt(metrics[k])}" for k in names if metrics[k].numel() == 1)
        prefix = f"{self.label}: " if self.label else ""
        logger.info("%sepoch %d/%d: %s (%.1f s)", prefix, trainer.current_epoch + 1, trainer.max_epochs, values,
                    time.perf_counter() - self.start)
