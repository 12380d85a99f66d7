"""Build an encoder's timm model: random initialisation, or weights from the hub or disk.

Weights may be given as

* ``hf-hub:org/name``: downloaded with ``huggingface_hub`` (gated models need a token);
* a local folder in the hub's layout: ``config.json`` (optional) plus ``model.safetensors``
  or ``pytorch_model.bin``, e.g. made with ``hf download org/name --local-dir DIR``;
* a single ``.safetensors`` / ``.bin`` / ``.pth`` / ``.pt`` file.

A folder's ``config.json`` ``model_args`` are the base of the architecture arguments and
the registry entry's arguments override them, as timm does for
``create_model("hf-hub:...", **kwargs)``. Weights are checked key by key against the
architecture before loading, and pickled files are read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

logger = logging.getLogger(__name__)

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
RANDOM = "random"
RANDOM_ID = "random-init"
RANDOM_SEED = 0  # random initialisation is reproducible: same model in every process
# The pipeline needs every token from forward(), whatever a config.json says.
FORCED_KWARGS = {"num_classes": 0, "global_pool": ""}
_SHOWN = 8  # keys listed per category in a mismatch error


class WeightsError(ValueError):
    """Weights that cannot be found, read or loaded; the message names the source."""


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    weights_id: str  # "sha256:<16 hex>" of the weights file, or "random-init"
    source: str  # hub id or path as given, or "random-init"


def is_hub_id(weights: str) -> bool:
    return weights.startswith(HUB_PREFIXES)


def file_sha256(path: Path, chars: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:chars]


HUB_PROBE_SECONDS = 3.0  # a reachable hub answers a TCP connect well within this


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub's host (``HF_ENDPOINT``, default huggingface.co) accepts a TCP connection on its port.

    Asked once before a download so that an offline machine fails in seconds, not after
    ``huggingface_hub``'s retries with back-off (36 s for ``mil extract`` with a hub id on this project's offline machine). Behind a proxy (``HTTPS_PROXY`` /
    ``ALL_PROXY`` set) a direct connection says nothing, so the answer is True there.
    """
    import os
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _download(hub_id: str) -> tuple[Path | None, Path]:
    """Fetch ``config.json`` and the first weights file the repo has (from the local cache when the hub is
    unreachable: :func:`hub_reachable`)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo = hub_id.split(":", 1)[1]
    cached_only = not constants.HF_HUB_OFFLINE and not hub_reachable()
    if cached_only:
        logger.warning("cannot reach %s within %.0f s: looking for %s in the local Hugging Face cache only",
                       constants.ENDPOINT, HUB_PROBE_SECONDS, hub_id)

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=cached_only))
        except EntryNotFoundError as e:
            if isinstance(e, LocalEntryNotFoundError):  # offline / not cached: not "file missing"
                raise
            return None

    try:
        config = fetch("config.json")
        for name in WEIGHT_FILES:
            if (weights := fetch(name)) is not None:
                return config, weights
    except Exception as e:  # offline, gated, no token, unknown repo, network errors
        raise WeightsError(
            f"cannot get weights {hub_id!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Gated models need an accepted licence and "
            f"a token (`hf auth login` or HF_TOKEN). On an offline machine, download on one with "
            f"access (`hf download {repo} --local-dir /path/{repo.split('/')[-1]}`), copy the folder "
            f"and set encoder.weights=/path/{repo.split('/')[-1]} (a folder with config.json and "
            f"{' or '.join(WEIGHT_FILES)})"
        ) from e
    raise WeightsError(f"hub repo {repo!r} has none of {', '.join(WEIGHT_FILES)}")


def _locate(weights: str) -> tuple[Path | None, Path]:
    """(config.json or None, weights file) for a hub id, folder or file."""
    if is_hub_id(weights):
        return _download(weights)
    path = Path(weights).expanduser()
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                config = path / "config.json"
                return (config if config.is_file() else None), path / name
        raise WeightsError(
            f"weights folder {path} has none of {', '.join(WEIGHT_FILES)} "
            f"(found: {', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'})"
        )
    if path.is_file():
        return None, path
    raise WeightsError(
        f"encoder.weights={weights!r} is neither a hub id (hf-hub:org/name), a folder nor a file"
    )


def read_model_args(config: Path | None, architecture: str) -> dict[str, Any]:
    """``model_args`` of a hub-style config.json, after checking its architecture."""
    if config is None:
        return {}
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{config}: not a readable JSON file ({e})") from None
    arch = data.get("architecture")
    if arch is not None and arch != architecture:
        raise WeightsError(
            f"{config}: architecture {arch!r} does not match the encoder's {architecture!r}; "
            f"check encoder.name"
        )
    return dict(data.get("model_args") or {})


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or (weights-only) torch file, unwrapped to the model's keys."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:  # mmap avoids a second copy of a multi-GB file; old (non-zip) files cannot
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, encoder: str) -> None:
    """Raise :class:`WeightsError` naming missing, unexpected and wrongly shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k}: file {got[k]} vs model {expected[k]}" for k in sorted(set(got) & set(expected))
              if got[k] != expected[k]]
    if not (missing or unexpected or shapes):
        return

    def part(label: str, items: list[str]) -> str:
        more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
        return f"{len(items)} {label}: {', '.join(items[:_SHOWN])}{more}"

    parts = [part(lbl, items) for lbl, items in
             (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch(es)", shapes))
             if items]
    raise WeightsError(
        f"weights {source} do not fit encoder {encoder!r}: {'; '.join(parts)}. "
        f"Are they the weights of another model? Check encoder.name."
    )


def create_architecture(architecture: str, kwargs: Mapping[str, Any]) -> nn.Module:
    return timm.create_model(architecture, pretrained=False, **{**kwargs, **FORCED_KWARGS})


def build_model(
    name: str,
    architecture: str,
    model_kwargs: Mapping[str, Any],
    weights: str | None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Create ``architecture`` and fill it: ``weights=None`` (or ``"random"``) -> seeded random init."""
    device = torch.device(device)
    if weights is None or weights in (RANDOM, RANDOM_ID):  # RANDOM_ID: as recorded in bags
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.device(device):
            torch.manual_seed(RANDOM_SEED)
            model = create_architecture(architecture, model_kwargs)
        logger.warning("encoder %r is randomly initialised: its features are not for science", name)
        return LoadedModel(model, RANDOM_ID, RANDOM_ID)

    config, path = _locate(str(weights))
    kwargs = {**read_model_args(config, architecture), **model_kwargs}
    # Build on the meta device (no random init of ~1B parameters), then adopt the file's tensors.
    with torch.device("meta"):
        model = create_architecture(architecture, kwargs)
    state = read_state_dict(path)
    source = str(weights) if is_hub_id(str(weights)) else str(path)
    check_keys(model, state, source, name)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    state = {k: v.to(dtypes[k]) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise WeightsError(f"weights {source}: some tensors of {name!r} were not filled")
    logger.info("loaded %s weights from %s", name, source)
    return LoadedModel(model.to(device), f"sha256:{file_sha256(path)}", source)


def default_device(requested: str = "auto") -> torch.device:
    """``auto``: this process's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
