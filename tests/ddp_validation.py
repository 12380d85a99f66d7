"""Run by ``tests/test_crossval.py`` under Lightning DDP (2 CPU processes, gloo), not collected by pytest.

``python tests/ddp_validation.py RECORDS_DIR <mil train overrides>``: trains with ``mil.crossval.run_train``
and, for each validation epoch, writes ``RECORDS_DIR/rank<r>_epoch<e>.json`` with the validation bags this
process scored (dataset indices), their logits and targets, and the validation metrics Lightning logged.
Lightning's subprocess launcher starts rank 1 by running this same file again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import mil.training as training  # noqa: E402
from mil.config import load_config  # noqa: E402
from mil.crossval import run_train  # noqa: E402

records = Path(sys.argv[1])
real_step, real_end = training.MILModule.validation_step, training.MILModule.on_validation_epoch_end


def validation_step(self, batch, batch_idx):
    with torch.no_grad():
        logits = self(batch["features"], batch["mask"]).logits.float()
    seen = self.__dict__.setdefault("_seen", [])
    seen += [(int(i), row, int(t)) for i, row, t in zip(batch["index"], logits.tolist(), batch["target"], strict=True)]
    return real_step(self, batch, batch_idx)


def on_validation_epoch_end(self):
    real_end(self)
    metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val_")}
    seen = self.__dict__.pop("_seen", [])
    records.mkdir(parents=True, exist_ok=True)
    (records / f"rank{self.global_rank}_epoch{self.current_epoch}.json").write_text(
        json.dumps({"seen": seen, "metrics": metrics, "world_size": self.trainer.world_size}))


training.MILModule.validation_step = validation_step
training.MILModule.on_validation_epoch_end = on_validation_epoch_end
run_train(load_config(sys.argv[2:]))
