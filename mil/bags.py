"""The HDF5 bag format: one file per slide, shared by every writer and reader.

A bag file holds

* ``features``: [N, D] float16 or float32, one row per tile;
* ``coords``: [N, 2] int, level-0 pixel (x, y) of each tile's top-left corner (optional;
  a ``unit`` attribute of ``"px"`` or none; STAMP's µm coordinates, ``unit="um"``, are
  converted to level-0 pixels on reading, see :func:`read_tile_geometry`);
* file attributes describing how the features were made (see :data:`PROVENANCE_ATTRS`).

Bags written by CLAM and TRIDENT (``features``, ``coords``) and by STAMP (``feats``,
``coords``) load as they are; their missing attributes read as ``"unknown"``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mil import __version__
from mil.io import atomic_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FEATURE_KEYS = ("features", "feats")  # ours/CLAM/TRIDENT, then STAMP
COORDS_KEY = "coords"
# Attributes that identify the feature space: bags that differ in any of these cannot be mixed,
# and a model only applies to bags that agree with its training bags in all of them. The
# resolution (µm/px) and tile size change what a tile shows, hence what its feature means.
IDENTITY_ATTRS = ("encoder", "encoder_weights", "embedding", "mpp", "tile_px")
# Attributes our writers record (encoders may add more, e.g. slide geometry).
PROVENANCE_ATTRS = (
    *IDENTITY_ATTRS,
    "tile_px",
    "mpp",
    "tile_size_level0",
    "slide_mpp",
    "slide_width",
    "slide_height",
    "toolkit_version",
    "format_version",
)
UNKNOWN = "unknown"


class BagError(ValueError):
    """A bag file that cannot be used; the message names the file."""


class EmptyBagError(BagError):
    """A bag with 0 tiles (a slide without tissue): cohorts skip it rather than stop."""


@dataclass(frozen=True)
class BagInfo:
    """What a bag holds, read from its header without loading the features."""

    path: Path
    n_tiles: int
    dim: int
    dtype: str
    feature_key: str
    has_coords: bool
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> dict[str, str]:
        """The identity of the feature space (see :data:`IDENTITY_ATTRS`); ``"unknown"`` where a bag
        (e.g. from another tool) does not record an attribute."""
        return {k: identity_value(self.attrs.get(k, UNKNOWN)) for k in IDENTITY_ATTRS}


def identity_value(value: Any) -> str:
    """An identity attribute as a comparable string: numbers to 6 significant digits (0.5 == 0.50000001)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _feature_key(f: h5py.File, path: Path) -> str:
    for key in FEATURE_KEYS:
        if key in f:
            return key
    raise BagError(
        f"{path}: no feature dataset; expected one of {', '.join(FEATURE_KEYS)}, found {sorted(f.keys())}"
    )


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise BagError(f"{path}: bag file does not exist") from None
    except OSError as e:  # h5py raises OSError for truncated / non-HDF5 files
        raise BagError(f"{path}: not a readable HDF5 bag ({e})") from None


def read_bag_info(path: str | os.PathLike) -> BagInfo:
    """Read shape, dtype and attributes of a bag; raises :class:`BagError` naming the file."""
    path = Path(path)
    with _open(path) as f:
        key = _feature_key(f, path)
        ds = f[key]
        if ds.ndim == 3 and ds.shape[0] == 1:  # some CLAM versions store [1, N, D]
            n, dim = ds.shape[1], ds.shape[2]
        elif ds.ndim == 2:
            n, dim = ds.shape
        else:
            raise BagError(f"{path}: dataset {key!r} has shape {ds.shape}; expected [N, D]")
        if n == 0:
            raise EmptyBagError(f"{path}: bag is empty (0 tiles)")
        if not np.issubdtype(ds.dtype, np.floating):
            raise BagError(f"{path}: features have dtype {ds.dtype}; expected float16 or float32")
        attrs = {k: _decode(v) for k, v in f.attrs.items()}
        return BagInfo(
            path=path,
            n_tiles=int(n),
            dim=int(dim),
            dtype=str(ds.dtype),
            feature_key=key,
            has_coords=COORDS_KEY in f,
            attrs=attrs,
        )


def read_features(path: str | os.PathLike, indices: np.ndarray | None = None) -> np.ndarray:
    """Read the [N, D] feature matrix (or the rows in ``indices``), checking it is finite."""
    path = Path(path)
    with _open(path) as f:
        ds = f[_feature_key(f, path)]
        try:
            x = ds[0] if ds.ndim == 3 else ds[()]
        except OSError as e:
            raise BagError(f"{path}: features cannot be read ({e})") from None
    if indices is not None:
        x = x[indices]
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise BagError(f"{path}: features contain NaN or inf in {bad} tile(s)")
    return x


def count_nonfinite_tiles(path: str | os.PathLike, chunk_rows: int = 8192) -> int:
    """Number of tiles (rows) with a NaN or inf feature, reading ``chunk_rows`` rows at a time.

    Memory stays at one chunk (a 8192 x 2560 float16 chunk is 40 MB) for bags of any size.
    """
    path = Path(path)
    bad = 0
    with _open(path) as f:
        ds = f[_feature_key(f, path)]
        n = ds.shape[1] if ds.ndim == 3 else ds.shape[0]
        try:
            for start in range(0, n, chunk_rows):
                x = ds[0, start : start + chunk_rows] if ds.ndim == 3 else ds[start : start + chunk_rows]
                bad += int((~np.isfinite(x)).any(axis=1).sum())
        except OSError as e:
            raise BagError(f"{path}: features cannot be read ({e})") from None
    return bad


# Spellings of the coordinate unit attribute: level-0 pixels, or micrometres (STAMP >= 2).
PIXEL_UNITS = ("px", "pixel", "pixels", "level0", "level-0")
MICRON_UNITS = ("um", "µm", "μm", "micron", "microns", "micrometer", "micrometre")


@dataclass(frozen=True)
class TileGeometry:
    """Where a bag's tiles lie on the slide, in level-0 pixels whatever unit the file used."""

    coords: np.ndarray  # [N, 2] int64, level-0 pixel (x, y) of each tile's top-left corner
    tile_size_level0: float | None  # tile side in level-0 pixels, when the file establishes it
    unit: str  # the unit stored in the file: "px" or "um"


def _coord_unit(f: h5py.File, path: Path) -> str:
    """The stored unit of ``coords``: "px" or "um"; raises when it cannot be established."""
    unit = f[COORDS_KEY].attrs.get("unit", f.attrs.get("unit"))
    if unit is not None:
        text = str(_decode(unit)).strip().lower()
        if text in PIXEL_UNITS:
            return "px"
        if text in MICRON_UNITS:
            return "um"
        raise BagError(f"{path}: tile coordinates have unit {text!r}; known units are level-0 pixels "
                       f"({', '.join(PIXEL_UNITS)}) and micrometres ({', '.join(MICRON_UNITS)})")
    if "tile_size_um" in f.attrs or _feature_key(f, path) == "feats":
        # STAMP bags: from 2.x the coordinates are µm (with unit="um"); without the unit
        # attribute the scale is unknown (older STAMP versions wrote other units).
        raise BagError(
            f"{path}: a STAMP-style bag whose tile coordinates have no 'unit' attribute, so their scale "
            "(µm or pixels, at which level) cannot be established; re-extract with STAMP >= 2, or set the "
            "attribute (h5py: f['coords'].attrs['unit'] = 'um' or 'px') if you know it")
    return "px"  # ours, CLAM and TRIDENT: level-0 pixels


def read_tile_geometry(path: str | os.PathLike, slide_mpp: float | None = None) -> TileGeometry | None:
    """Tile corners in level-0 pixels (``None`` when the bag has no ``coords``).

    Coordinates stored in µm (STAMP: ``unit="um"``, ``tile_size_um``) are divided by the
    slide's level-0 resolution: the bag's ``slide_mpp`` attribute, else ``slide_mpp`` given
    here (µm per level-0 pixel). Raises :class:`BagError` naming the file when the unit or
    the resolution cannot be established; coordinates are never guessed.
    """
    path = Path(path)
    with _open(path) as f:
        if COORDS_KEY not in f:
            return None
        unit = _coord_unit(f, path)
        coords = f[COORDS_KEY][()]
        attrs = {k: _decode(v) for k, v in f.attrs.items()}
    coords = coords.reshape(-1, 2) if coords.ndim == 3 else coords
    if unit == "px":
        size = attrs.get("tile_size_level0")
        return TileGeometry(coords.astype(np.int64), None if size is None else float(size), unit)
    mpp = attrs.get("slide_mpp", slide_mpp)
    if mpp is None or not float(mpp) > 0:
        raise BagError(
            f"{path}: tile coordinates are in micrometres (unit='um', as STAMP writes them); converting them "
            "to level-0 pixels needs the slide's resolution: set slides.mpp=<µm per level-0 pixel> or an "
            "'mpp' column in the slide table")
    mpp = float(mpp)
    size_um = attrs.get("tile_size_um")
    return TileGeometry(np.round(coords / mpp).astype(np.int64), None if size_um is None else float(size_um) / mpp, unit)


def read_coords(path: str | os.PathLike, slide_mpp: float | None = None) -> np.ndarray | None:
    """Read the [N, 2] level-0 pixel tile coordinates, or ``None`` when the bag has none.

    µm coordinates are converted with the slide's mpp (see :func:`read_tile_geometry`).
    """
    geometry = read_tile_geometry(path, slide_mpp)
    return None if geometry is None else geometry.coords


def write_bag(
    path: str | os.PathLike,
    features: np.ndarray,
    coords: np.ndarray | None = None,
    attrs: Mapping[str, Any] | None = None,
    dtype: str = "float16",
) -> Path:
    """Write a bag atomically: to a temporary name first, renamed when complete.

    A killed writer therefore never leaves a file that looks like a finished bag.
    """
    path = Path(path)
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] == 0:
        raise BagError(f"{path}: features must be a non-empty [N, D] array, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise BagError(f"{path}: refusing to write features containing NaN or inf")
    if coords is not None:
        coords = np.asarray(coords)
        if coords.shape != (features.shape[0], 2):
            raise BagError(f"{path}: coords shape {coords.shape} does not match features {features.shape}")
    with np.errstate(over="ignore"):  # checked just below
        stored = features.astype(dtype)
    if not np.isfinite(stored).all():  # e.g. |x| > 65504 overflows float16 to inf
        logger.warning(
            "%s: features up to %.4g overflow %s; keeping float32 for this bag",
            path, float(np.abs(features).max()), dtype,
        )
        stored = features.astype(np.float32)
        if not np.isfinite(stored).all():
            raise BagError(f"{path}: features up to {float(np.abs(features).max()):.4g} overflow float32")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=stored)
        if coords is not None:
            f.create_dataset(COORDS_KEY, data=coords.astype(np.int64))
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["toolkit_version"] = __version__
        for key, value in (attrs or {}).items():
            if value is not None:
                f.attrs[key] = value
    return path
