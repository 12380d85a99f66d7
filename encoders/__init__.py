"""Slides to bags: tiling at an exact resolution, frozen tile encoders, HDF5 bag writing.

``create_encoder("virchow2", weights="hf-hub:paige-ai/Virchow2")`` builds an encoder;
``encoders.extract.run_extract(cfg)`` runs the whole ``mil extract`` pipeline.
"""

from encoders.models import ENCODERS, EncoderSpec, TimmEncoder, create_encoder
from encoders.recipes import RECIPES
from encoders.weights import WeightsError

__all__ = ["ENCODERS", "RECIPES", "EncoderSpec", "TimmEncoder", "WeightsError", "create_encoder"]
