"""`mil view`: the viewer's server through HTTP on a random local port, and one real-browser test."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest
from matplotlib import colormaps
from PIL import Image

from encoders.extract import run_extract
from encoders.slides import open_slide, read_region
from encoders.synthetic_slides import make_slide_cohort
from mil.attention import slide_attention
from mil.bags import read_bag_info, read_features, write_bag
from mil.config import load_config
from mil.crossval import run_crossval
from mil.heatmap_render import CMAP
from mil.predict import load_run
from mil.view import ViewerStartError, open_viewer
from mil.view.app import cookie_name
from mil.view.data import overlay_size

TRAIN = [
    "model.name=gated_abmil", "model.args={hidden_dim: 16}", "cv.folds=2", "cv.bootstrap=10", "train.max_epochs=2",
    "train.min_steps=0", "train.refit=false", "train.min_epochs=1", "train.batch_size=4", "train.bag_size=null", "train.precision=32-true",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.logger=none",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny demo-like run: 8 patients with 1-2 synthetic slides each (768x576 px), 64-px tiles, a 2-fold crossval."""
    root = tmp_path_factory.mktemp("view")
    cohort = make_slide_cohort(root / "cohort", n_patients=8, positive_fraction=0.5, seed=3, size=(768, 576))
    run_extract(load_config([
        f"slides.csv={cohort.slide_csv}", f"features_dir={root / 'bags'}", "encoder.name=random-vit-tiny",
        "encoder.device=cpu", "encoder.batch_size=64", "loader.workers=0", "tiling.tile_px=64", "tiling.thumbnail_px=512",
    ]))
    keys = [f"cohort.clinical_csv={cohort.clinical_csv}", f"cohort.slide_csv={cohort.slide_csv}",
            f"cohort.features_dir={root / 'bags'}", "cohort.target=MSI", "cohort.classes=[MSS,MSI-H]"]
    run = run_crossval(load_config([*keys, *TRAIN, f"output_dir={root / 'cv'}"]))
    return run, cohort, root


@pytest.fixture(scope="module")
def server(tiny_run):
    run, _, _ = tiny_run
    viewer = open_viewer(run, [], port=0).start()
    yield viewer
    viewer.stop()


class Client:
    """Raw HTTP (no URL normalisation, so traversal attempts reach the server as written)."""

    def __init__(self, port: int, token: str | None) -> None:
        self.port, self.token = port, token

    def get(self, path: str, token: bool = True, headers: dict | None = None, method: str = "GET"):
        if token and self.token:
            path += ("&" if "?" in path else "?") + "token=" + self.token
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, headers=headers or {})
        res = conn.getresponse()
        body = res.read()
        conn.close()
        return res.status, dict(res.getheaders()), body


@pytest.fixture(scope="module")
def client(server):
    return Client(server.port, server.token)


def _slide_ids(cohort) -> list[str]:
    return pd.read_csv(cohort.slide_csv, dtype=str).slide_id.tolist()


# ---------------------------------------------------------------- pages and JSON
def test_cohort_page_lists_every_bag_with_label_fold_probability_and_call(tiny_run, client):
    run, cohort, _ = tiny_run
    status, headers, body = client.get("/")
    assert status == 200 and b"<table" in body and headers["content-type"].startswith("text/html")
    status, _, body = client.get("/api/cohort")
    info = json.loads(body)
    pred = pd.read_csv(run / "predictions.csv", dtype={"patient_id": str})
    assert status == 200 and len(info["rows"]) == len(pred) == 8  # patient-level bags
    assert info["positive"] == "MSI-H" and info["predictions"].endswith("predictions.csv")
    for row in info["rows"]:
        p = pred[pred.patient_id == row["patient_id"]].iloc[0]
        assert row["label"] == p["MSI"] and row["fold"] == str(p["fold"])
        assert row["prob"] == pytest.approx(p["prob_MSI-H"])
        assert row["called"] == ("MSI-H" if p["prob_MSI-H"] > p["prob_MSS"] else "MSS")
        assert row["slides"] and all(s.startswith(row["patient_id"]) for s in row["slides"])
    sid = _slide_ids(cohort)[0]
    status, _, body = client.get("/slide/" + sid)
    assert status == 200 and b"openseadragon.min.js" in body
    for asset in ("/static/openseadragon/openseadragon.min.js", "/static/openseadragon/LICENSE.txt",
                  "/static/openseadragon/images/home_rest.png", "/static/slide.js", "/static/cohort.js"):
        assert client.get(asset)[0] == 200, asset


def test_slide_scores_are_those_of_mil_heatmap(tiny_run, client):
    run, cohort, _ = tiny_run
    sid = _slide_ids(cohort)[1]
    info = json.loads(client.get("/api/slide/" + sid)[2])
    r = load_run(run)
    expected = slide_attention(r, r.config, [sid])[0]
    np.testing.assert_allclose(info["score"], expected.scores, rtol=1e-5)
    np.testing.assert_array_equal(np.c_[info["x"], info["y"]], expected.coords)
    order = np.argsort(-expected.scores, kind="stable")
    assert info["top"][0] == order[0] and info["bottom"][0] == order[-1]
    assert info["has_slide"] and info["dzi"] and set(info["probs"]) == {"MSS", "MSI-H"}


def test_deep_zoom_tile_is_a_valid_image_of_the_right_size_with_the_slide_pixels(tiny_run, client):
    _, cohort, _ = tiny_run
    sid = _slide_ids(cohort)[0]
    status, _, body = client.get(f"/dz/{sid}/slide.dzi")
    assert status == 200
    size = ET.fromstring(body).find("{*}Size")
    W, H = int(size.get("Width")), int(size.get("Height"))
    path = cohort.root / "slides" / f"{sid}.tiff"
    slide = open_slide(path)
    assert (W, H) == slide.dimensions
    top = int(np.ceil(np.log2(max(W, H))))  # the full-resolution Deep Zoom level
    for col, row in ((0, 0), (1, 1)):
        status, headers, body = client.get(f"/dz/{sid}/slide_files/{top}/{col}_{row}.jpeg")
        assert status == 200 and headers["content-type"] == "image/jpeg"
        tile = Image.open(io.BytesIO(body))
        tile.load()
        x0, y0 = max(0, 254 * col - 1), max(0, 254 * row - 1)  # 254-px tiles with a 1-px overlap
        w = min(254 * (col + 1) + 1, W) - x0
        h = min(254 * (row + 1) + 1, H) - y0
        assert tile.format == "JPEG" and tile.size == (w, h)
        truth = np.asarray(read_region(slide, path, (x0, y0), 0, (w, h)), float)
        assert np.abs(np.asarray(tile.convert("RGB"), float) - truth).mean() < 6  # JPEG round trip
    slide.close()
    assert client.get(f"/dz/{sid}/slide_files/{top + 1}/0_0.jpeg")[0] == 404
    assert client.get(f"/dz/{sid}/slide_files/{top}/99_0.jpeg")[0] == 404


def test_overlay_aligns_with_the_tile_boxes(tiny_run, client):
    _, cohort, _ = tiny_run
    sid = _slide_ids(cohort)[0]
    info = json.loads(client.get("/api/slide/" + sid)[2])
    W, H, ts = info["width"], info["height"], info["tile_size"]
    status, headers, body = client.get(f"/api/slide/{quote(sid)}/overlay/slide.png")
    assert status == 200 and headers["content-type"] == "image/png"
    overlay = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))
    w, h = overlay_size(W, H, ts)
    assert overlay.shape[:2] == (h, w) and abs(w / h - W / H) < 2 / min(w, h)
    cmap = colormaps[CMAP]
    boxes = np.zeros((h, w), bool)
    for x, y, p in zip(info["x"], info["y"], info["percentile"], strict=True):
        # the centre of the tile's box, mapped to the raster, has the tile's colour
        cx, cy = int((x + ts / 2) * w / W), int((y + ts / 2) * h / H)
        expected = np.array(cmap(p, bytes=True)[:3])
        assert overlay[cy, cx, 3] == 255
        assert np.abs(overlay[cy, cx, :3].astype(int) - expected).max() <= 2, (x, y)
        boxes[int(np.floor(y * h / H)):int(np.ceil((y + ts + 1) * h / H)),
              int(np.floor(x * w / W)):int(np.ceil((x + ts + 1) * w / W))] = True
    assert (overlay[..., 3][~boxes] == 0).all()  # nothing painted outside the tiles' boxes
    assert (overlay[..., 3] == 0).any()  # the synthetic slides have background


def test_cohort_scale_and_tissue_mask(tiny_run, client):
    _, cohort, _ = tiny_run
    sid = _slide_ids(cohort)[0]
    slide_scale = np.asarray(Image.open(io.BytesIO(client.get(f"/api/slide/{sid}/overlay/slide.png")[2])))
    status, _, body = client.get(f"/api/slide/{sid}/overlay/cohort.png")
    cohort_scale = np.asarray(Image.open(io.BytesIO(body)))
    assert status == 200 and cohort_scale.shape == slide_scale.shape
    assert ((cohort_scale[..., 3] > 0) == (slide_scale[..., 3] > 0)).all()
    assert client.get(f"/api/slide/{sid}/overlay/viridis.png")[0] == 404
    status, _, body = client.get(f"/api/slide/{sid}/tissue.png")
    mask = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))
    assert status == 200 and 0.05 < (mask[..., 3] > 0).mean() < 0.95
    status, _headers, body = client.get(f"/api/slide/{sid}/tile/0.jpeg")
    assert status == 200 and Image.open(io.BytesIO(body)).size == (160, 160)


# ---------------------------------------------------------------- safety
def test_the_token_is_required_on_every_request(tiny_run, server, client):
    _, cohort, _ = tiny_run
    sid = _slide_ids(cohort)[0]
    for path in ("/", "/api/cohort", f"/slide/{sid}", f"/api/slide/{sid}", f"/dz/{sid}/slide.dzi",
                 "/static/openseadragon/openseadragon.min.js", "/static/slide.js"):
        assert client.get(path, token=False)[0] == 403, path
        assert client.get(path + "?token=wrong", token=False)[0] == 403, path
        assert client.get(path, token=False, headers={"Cookie": f"{cookie_name(server.port)}=wrong"})[0] == 403
    _status, headers, _ = client.get("/")
    cookie = headers["set-cookie"]
    assert f"{cookie_name(server.port)}={server.token}" in cookie and "HttpOnly" in cookie
    assert client.get("/api/cohort", token=False, headers={"Cookie": cookie.split(";")[0]})[0] == 200
    assert client.get("/api/cohort", token=False, headers={"Cookie": f"{cookie_name(server.port + 1)}={server.token}"}
                      )[0] == 403  # another server's cookie


def test_traversal_and_ids_outside_the_cohort_get_404(tiny_run, client):
    _run, cohort, _root = tiny_run
    absolute = quote(str(cohort.root / "slides" / f"{_slide_ids(cohort)[0]}.tiff"), safe="")
    for path in ("/slide/..", "/slide/../../etc/passwd", "/slide/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                 f"/slide/{absolute}", "/api/slide/..%2Frun.yaml", f"/api/slide/{absolute}",
                 "/dz/..%2F..%2Fetc%2Fpasswd/slide.dzi", f"/dz/{absolute}/slide.dzi",
                 "/dz/..%2Fslides%2FP0000-S0.tiff/slide_files/0/0_0.jpeg", "/api/slide/NOPE/overlay/slide.png",
                 "/static/../data.py", "/static/%2e%2e/data.py", "/static/..%2Fdata.py", "/etc/passwd",
                 "/slide/NOT-A-SLIDE"):
        status, _, body = client.get(path)
        assert status == 404, path
        assert b"Traceback" not in body and b"import " not in body


def test_the_server_is_read_only(client):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert client.get("/api/cohort", method=method)[0] == 405, method


def test_busy_port_and_other_hosts(tiny_run, server, caplog):
    run, _, _ = tiny_run
    with pytest.raises(ViewerStartError, match=f"port {server.port} .* in use.*--port"):
        open_viewer(run, [], port=server.port)
    other = open_viewer(run, [], host="0.0.0.0", port=0)
    try:
        assert "anyone who can reach" in caplog.text
    finally:
        other.stop()


# ---------------------------------------------------------------- bad input
def test_without_the_slide_file_the_tiles_are_shown_on_a_blank_canvas(tiny_run, tmp_path):
    run, cohort, _root = tiny_run
    table = pd.read_csv(cohort.slide_csv, dtype=str)
    gone = table.slide_id.iloc[0]
    table["path"] = [str(cohort.root / p) for p in table.path]
    table.loc[0, "path"] = str(tmp_path / "moved.tiff")
    table.to_csv(tmp_path / "slides.csv", index=False)
    viewer = open_viewer(run, [f"cohort.slide_csv={tmp_path / 'slides.csv'}"], port=0).start()
    try:
        c = Client(viewer.port, viewer.token)
        status, _, body = c.get(f"/api/slide/{gone}")
        info = json.loads(body)
        assert status == 200 and not info["has_slide"] and info["dzi"] is None
        assert "moved.tiff" in info["message"] and len(info["score"]) > 0
        assert c.get(f"/api/slide/{gone}/overlay/slide.png")[0] == 200
        assert c.get(f"/dz/{gone}/slide.dzi")[0] == 404
        assert c.get(f"/api/slide/{gone}/tile/0.jpeg")[0] == 404
        assert c.get(f"/slide/{gone}")[0] == 200
        cohort_info = json.loads(c.get("/api/cohort")[2])
        assert "not the run's own" in cohort_info["predictions"]  # another slide table: no out-of-fold predictions
        assert all(r["prob"] is None for r in cohort_info["rows"])
    finally:
        viewer.stop()


def test_a_bag_without_coordinates_is_a_clear_message(tiny_run, tmp_path):
    run, cohort, root = tiny_run
    shutil.copytree(root / "bags", tmp_path / "bags", ignore=shutil.ignore_patterns("qc"))
    sid = _slide_ids(cohort)[0]
    bag = tmp_path / "bags" / f"{sid}.h5"
    info = read_bag_info(bag)
    write_bag(bag, read_features(bag), None, info.attrs)
    viewer = open_viewer(run, [f"cohort.features_dir={tmp_path / 'bags'}"], port=0).start()
    try:
        c = Client(viewer.port, viewer.token)
        status, _, body = c.get(f"/api/slide/{sid}")
        assert status == 422 and "no tile coordinates" in json.loads(body)["error"]
        status, _, body = c.get(f"/dz/{sid}/slide.dzi")
        assert status == 422 and b"no tile coordinates" in body and b"Traceback" not in body
    finally:
        viewer.stop()


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished run folder"):
        open_viewer(tmp_path, [], port=0)


def test_the_command_prints_a_working_link(tiny_run):
    run, _, _ = tiny_run
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "mil", "view", str(run), "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", line)
            if m:
                break
            assert proc.poll() is None, "".join(seen)
        assert m, "".join(seen)
        c = Client(int(m.group(1)), m.group(2))
        assert c.get("/api/cohort")[0] == 200
        assert c.get("/api/cohort", token=False)[0] == 403
        assert any("ssh -L" in s for s in seen)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- a real browser
def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_the_slide_page_in_headless_chromium(tiny_run, server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    found = _chromium()
    if found is None:
        pytest.skip("headless Chromium not found: install Debian's `chromium` and `chromium-driver` (.ci/run does)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, cohort, _ = tiny_run
    sid = _slide_ids(cohort)[0]
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(f"http://127.0.0.1:{server.port}/slide/{sid}?token={server.token}")
        wait = WebDriverWait(driver, 40, poll_frequency=0.2)
        wait.until(lambda d: d.execute_script("return window.milView && window.milView.ready && window.milView.loaded()"))
        info = driver.execute_script("return window.milView.info")
        canvas = driver.find_element(By.CSS_SELECTOR, "#viewer .openseadragon-canvas")

        def shot(name: str) -> np.ndarray:
            path = tmp_path / name
            path.write_bytes(canvas.screenshot_as_png)
            return np.asarray(Image.open(path).convert("RGB")).astype(int)

        def settle():
            wait.until(lambda d: d.execute_script("return window.milView.loaded()"))
            time.sleep(0.3)  # OpenSeadragon blends tiles in over a few frames

        driver.execute_script("document.querySelector('#show-attention').click()")  # overlay off: the slide alone
        settle()
        plain = shot("slide.png")
        # the synthetic H&E: pink/purple tissue (R > G) on a light background, not a blank canvas
        tissue = (plain[..., 0] - plain[..., 1] > 25) & (plain.sum(-1) < 650)
        assert tissue.mean() > 0.02 and plain.std() > 10, "no slide pixels in the viewer"
        driver.execute_script("document.querySelector('#show-attention').click()")
        settle()
        shown = shot("overlay.png")
        assert shown.shape == plain.shape
        changed = np.abs(shown - plain).sum(-1) > 60
        assert changed.mean() > 0.02, "the attention overlay is not drawn"
        assert (~changed[~tissue]).mean() > 0.5  # mostly over the tissue, not everywhere
        # hover the best tile and read its score
        k = int(info["top"][0])
        x, y = driver.execute_script(f"return window.milView.pixelOf({k})")
        size = canvas.size
        ActionChains(driver).move_to_element_with_offset(canvas, int(x - size["width"] / 2),
                                                         int(y - size["height"] / 2)).perform()
        wait.until(lambda d: d.execute_script("return window.milView.hovered") == k)
        text = driver.find_element(By.ID, "readout-score").text
        assert float(text.split()[-1]) == pytest.approx(info["score"][k], rel=1e-4)
        # a gallery click jumps the viewer to the tile
        driver.find_element(By.CSS_SELECTOR, f"#bottom figure[data-index='{info['bottom'][0]}']").click()
        wait.until(lambda d: d.execute_script("return window.milView.viewer.viewport.getZoom() > 2"))
    finally:
        driver.quit()
