"""Attention-MIL aggregators: one file per family, all registered in :data:`MODELS`."""

from mil.models import abmil, clam, dsmil, pooling, transmil  # noqa: F401  (registers the models)
from mil.models.base import (
    MODELS,
    MILOutput,
    check_inputs,
    create_model,
    masked_softmax,
    model_train_defaults,
)

__all__ = ["MODELS", "MILOutput", "check_inputs", "create_model", "masked_softmax", "model_train_defaults"]
