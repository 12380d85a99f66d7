"""Tile encoders: registry, embedding recipes, weights from local checkpoints and the hub."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from encoders import ENCODERS, TimmEncoder, WeightsError, create_encoder
from encoders.preprocess import PreprocessSpec, TilePreprocess
from encoders.weights import create_architecture
from mil.registry import UnknownKeyError

TINY = {"embed_dim": 96, "depth": 2, "num_heads": 2}  # same architecture, SwiGLU-compatible width


def json_args(kwargs: dict) -> dict:
    """The JSON-able architecture arguments, as a hub config.json holds them."""
    return {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))}


def write_checkpoint(folder: Path, name: str, fmt: str = "safetensors", seed: int = 1,
                     architecture: str | None = None) -> torch.nn.Module:
    """A hub-layout folder (config.json + weights) for a tiny configuration of ``name``'s architecture."""
    spec = ENCODERS.get(name)
    kwargs = {**spec.model_kwargs, **TINY}
    torch.manual_seed(seed)
    model = create_architecture(spec.architecture, kwargs).eval()
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architecture": architecture or spec.architecture, "num_classes": 0, "global_pool": "",
              "model_args": json_args(kwargs)}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, folder / "model.safetensors")
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return model


def hooked_tokens(encoder: TimmEncoder) -> dict:
    """Capture the raw tokens of the model's forward during ``encode``."""
    captured: dict = {}
    encoder.model.register_forward_hook(lambda mod, inp, out: captured.__setitem__("tokens", out.detach()))
    return captured


# ---------------------------------------------------------------- registry
@pytest.mark.parametrize(
    ("name", "n_tokens", "embed_dim", "embedding"),
    [
        ("virchow", 257, 2560, "cls+mean_patch"),
        ("virchow2", 261, 2560, "cls+mean_patch_excl_reg"),
        ("uni2-h", 265, 1536, "cls"),
        ("h-optimus-0", 261, 1536, "cls"),
        ("prov-gigapath", 197, 1536, "cls"),
        ("random-vit-tiny", 54, 128, "cls+mean_patch_excl_reg"),
    ],
)
def test_registry_entries_build_the_published_architectures(name, n_tokens, embed_dim, embedding):
    spec = ENCODERS.get(name)
    with torch.device("meta"):  # shapes only: no memory, no init
        model = create_architecture(spec.architecture, spec.model_kwargs)
    encoder = TimmEncoder(spec, model, "meta", "meta", device="meta")
    size = spec.preprocess.input_px
    images = torch.empty(2, 3, size, size, device="meta")
    assert tuple(encoder.model(images).shape) == (2, n_tokens, encoder.token_dim)
    assert tuple(encoder.encode(images).shape) == (2, embed_dim) and encoder.embed_dim == embed_dim
    assert encoder.embedding == embedding


def test_unknown_encoder_lists_the_registry():
    with pytest.raises(UnknownKeyError) as err:
        create_encoder("virchow3")
    assert "virchow2" in str(err.value) and "random-vit-tiny" in str(err.value)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = create_encoder("random-vit-tiny")
    assert torch.equal(torch.rand(1), expected_next)
    b = create_encoder("random-vit-tiny", weights="random")
    assert a.weights_id == "random-init"
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


# ---------------------------------------------------------------- embedding recipes (tiny configurations)
def test_virchow2_recipe_excludes_the_register_tokens(tmp_path):
    write_checkpoint(tmp_path / "v2", "virchow2")
    enc = create_encoder("virchow2", weights=str(tmp_path / "v2"))
    captured = hooked_tokens(enc)
    x = torch.randn(3, 3, 224, 224)
    emb = enc.encode(x)
    tok = captured["tokens"]
    assert tok.shape == (3, 261, 96)
    by_hand = torch.cat([tok[:, 0], tok[:, 5:].mean(dim=1)], dim=1)  # tokens 1-4 are registers
    assert emb.shape == (3, 192) and enc.embed_dim == 192
    torch.testing.assert_close(emb, by_hand)
    wrong = torch.cat([tok[:, 0], tok[:, 1:].mean(dim=1)], dim=1)  # averaging the registers in
    assert not torch.allclose(emb, wrong)
    assert enc.bag_attrs()["embedding"] == "cls+mean_patch_excl_reg"

    cls_only = create_encoder("virchow2", weights=str(tmp_path / "v2"), embedding="cls")
    torch.testing.assert_close(cls_only.encode(x), tok[:, 0])
    assert cls_only.embed_dim == 96 and cls_only.bag_attrs()["embedding"] == "cls"


def test_virchow_recipe_averages_all_256_patch_tokens(tmp_path):
    write_checkpoint(tmp_path / "v1", "virchow")
    enc = create_encoder("virchow", weights=str(tmp_path / "v1"))
    captured = hooked_tokens(enc)
    emb = enc.encode(torch.randn(2, 3, 224, 224))
    tok = captured["tokens"]
    assert tok.shape == (2, 257, 96)
    torch.testing.assert_close(emb, torch.cat([tok[:, 0], tok[:, 1:].mean(dim=1)], dim=1))
    assert enc.embedding == "cls+mean_patch"


def test_unknown_recipe_is_rejected_before_building():
    with pytest.raises(UnknownKeyError, match="cls"):
        create_encoder("virchow2", embedding="cls+max")


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_local_hub_layout_checkpoint_round_trip(tmp_path, fmt):
    saved = write_checkpoint(tmp_path / "ckpt", "virchow2", fmt=fmt)
    enc = create_encoder("virchow2", weights=str(tmp_path / "ckpt"))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(enc.model(x), saved(x), rtol=0, atol=0)
    file = next(p for p in (tmp_path / "ckpt").iterdir() if p.name != "config.json")
    assert enc.weights_id == "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    assert enc.bag_attrs()["encoder_weights_source"] == str(file)


def test_single_weights_file_with_training_wrapper(tmp_path):
    source = create_encoder("random-vit-tiny")
    torch.save({"state_dict": source.model.state_dict(), "epoch": 3}, tmp_path / "tiny.pth")
    enc = create_encoder("random-vit-tiny", weights=str(tmp_path / "tiny.pth"))
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(enc.encode(x), source.encode(x))
    assert enc.weights_id.startswith("sha256:")


def test_weights_of_another_architecture_name_the_mismatched_keys(tmp_path):
    write_checkpoint(tmp_path / "v1", "virchow")  # no register tokens
    with pytest.raises(WeightsError) as err:
        create_encoder("virchow2", weights=str(tmp_path / "v1"))
    msg = str(err.value)
    assert "missing key(s): reg_token" in msg
    assert "pos_embed: file (1, 257, 96) vs model (1, 261, 96)" in msg
    assert "'virchow2'" in msg and str(tmp_path / "v1") in msg


def test_config_json_of_another_architecture_is_named(tmp_path):
    write_checkpoint(tmp_path / "g", "virchow2", architecture="vit_giant_patch14_dinov2")
    with pytest.raises(WeightsError, match="vit_giant_patch14_dinov2.*vit_huge_patch14_224"):
        create_encoder("virchow2", weights=str(tmp_path / "g"))


def test_missing_or_empty_weights_are_named(tmp_path):
    with pytest.raises(WeightsError, match="neither a hub id"):
        create_encoder("virchow2", weights=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="has none of model.safetensors, pytorch_model.bin"):
        create_encoder("virchow2", weights=str(tmp_path / "empty"))


def test_hub_name_offline_says_how_to_use_a_local_folder(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as err:
        create_encoder("virchow2", weights="hf-hub:paige-ai/Virchow2")
    msg = str(err.value)
    assert "hf-hub:paige-ai/Virchow2" in msg
    assert "hf download paige-ai/Virchow2 --local-dir" in msg and "encoder.weights=/path/Virchow2" in msg


def test_an_unreachable_hub_fails_at_once_from_the_local_cache(monkeypatch, caplog):
    """No network: one TCP probe, then the local cache only, not huggingface_hub's retries with back-off."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    probes = []

    def refused(address, *args, **kwargs):
        probes.append(address)
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", refused)
    with caplog.at_level("WARNING", logger="encoders.weights"), pytest.raises(WeightsError) as err:
        create_encoder("virchow2", weights="hf-hub:paige-ai/Virchow2")
    assert probes == [("huggingface.co", 443)]
    assert "cannot reach https://huggingface.co within 3 s" in caplog.text
    assert "encoder.weights=/path/Virchow2" in str(err.value)


# ---------------------------------------------------------------- preprocessing
def test_preprocess_equals_the_torchvision_chain_of_the_model_cards():
    tv = pytest.importorskip("torchvision.transforms")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    spec = PreprocessSpec(resize_px=256, crop_px=224)  # Prov-GigaPath's recipe
    chain = tv.Compose([
        tv.Resize(256, interpolation=tv.InterpolationMode.BICUBIC),
        tv.CenterCrop(224),
        tv.ToTensor(),
        tv.Normalize(spec.mean, spec.std),
    ])
    ours = TilePreprocess(spec)(img)
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, chain(img), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the full 632M architectures (about 10 s each)
def fill_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cheap non-trivial weights for every parameter: tiled slices of one random vector."""
    base = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    state = {}
    for i, (key, meta) in enumerate(model.state_dict().items()):
        n = meta.numel()
        off = (i * 7919) % base.numel()
        src = torch.cat([base[off:], base[:off]]).repeat(n // base.numel() + 1)[:n]
        state[key] = src.view(meta.shape).clone()
    return state


@pytest.mark.parametrize(("name", "n_tokens", "register_tokens"), [("virchow", 257, 0), ("virchow2", 261, 4)])
def test_full_architecture_checkpoint_gives_the_official_embedding(tmp_path, name, n_tokens, register_tokens):
    spec = ENCODERS.get(name)
    with torch.device("meta"):
        meta = create_architecture(spec.architecture, spec.model_kwargs)
    state = fill_state_dict(meta, torch.bfloat16)  # half the bytes to write; the loader casts to fp32
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": spec.architecture, "model_args":
                                                    json_args(dict(spec.model_kwargs))}))
    save_file(state, folder / "model.safetensors")
    probe = "blocks.31.mlp.fc1.weight"
    expected_probe = state[probe].float()
    del state

    enc = create_encoder(name, weights=str(folder))
    assert sum(p.numel() for p in enc.model.parameters()) > 630e6
    assert torch.equal(enc.model.state_dict()[probe], expected_probe)
    captured = hooked_tokens(enc)
    emb = enc.encode(torch.randn(1, 3, 224, 224))
    tok = captured["tokens"]
    assert tok.shape == (1, n_tokens, 1280) and emb.shape == (1, 2560)
    by_hand = torch.cat([tok[:, 0], tok[:, 1 + register_tokens :].mean(dim=1)], dim=1)
    torch.testing.assert_close(emb, by_hand)
