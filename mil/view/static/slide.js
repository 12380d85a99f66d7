// Slide page: OpenSeadragon over Deep Zoom tiles (or a blank canvas), attention and tissue overlays,
// hover read-out of the tile under the pointer, top/bottom tile gallery that jumps the viewer.
"use strict";
(function () {
  const $ = (sel) => document.querySelector(sel);
  const sid = decodeURIComponent(location.pathname.replace(/^\/slide\//, ""));
  const api = "/api/slide/" + encodeURIComponent(sid);
  const view = { ready: false, info: null, viewer: null, overlay: null, tissue: null, hovered: null };
  window.milView = view;  // for scripted checks (the browser test)

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function notice(text) { $("#notices").append(el("p", text, "notice")); }

  // ---------------------------------------------------------------- tiles: index and lookup
  let grid = new Map();
  function buildIndex(info) {
    grid = new Map();
    info.x.forEach((x, i) => grid.set(Math.round(x / info.tile_size) + "," + Math.round(info.y[i] / info.tile_size), i));
  }
  // The tile whose level-0 box [x, x + tile_size) x [y, y + tile_size) holds the point, or -1.
  function tileAt(X, Y) {
    const info = view.info, ts = info.tile_size;
    const i = Math.floor(X / ts), j = Math.floor(Y / ts);
    for (let a = i - 1; a <= i + 1; a++) for (let b = j - 1; b <= j + 1; b++) {
      const k = grid.get(a + "," + b);
      if (k !== undefined && X >= info.x[k] && X < info.x[k] + ts && Y >= info.y[k] && Y < info.y[k] + ts) return k;
    }
    return -1;
  }
  function tileRect(k, margin) {
    const info = view.info, W = info.width, ts = info.tile_size;
    return new OpenSeadragon.Rect((info.x[k] - margin * ts) / W, (info.y[k] - margin * ts) / W,
      (1 + 2 * margin) * ts / W, (1 + 2 * margin) * ts / W);
  }
  // Element pixel of a tile's centre (used by the browser test to hover a known tile).
  view.pixelOf = function (k) {
    const info = view.info, c = (info.tile_size / 2);
    const p = view.viewer.viewport.pixelFromPoint(new OpenSeadragon.Point((info.x[k] + c) / info.width, (info.y[k] + c) / info.width), true);
    return [p.x, p.y];
  };
  view.loaded = function () {
    const w = view.viewer && view.viewer.world;
    if (!w || !view.overlay) return false;
    for (let i = 0; i < w.getItemCount(); i++) {
      const item = w.getItemAt(i);
      if (item.getOpacity() > 0 && !item.getFullyLoaded()) return false;  // hidden items load nothing
    }
    return true;
  };

  // ---------------------------------------------------------------- read-out and highlight
  let box = null;
  function highlight(k) {
    if (k < 0) { if (box) box.style.display = "none"; return; }
    if (!box) {
      box = el("div", null, "tilebox");
      view.viewer.addOverlay({ element: box, location: tileRect(k, 0) });
    } else {
      view.viewer.updateOverlay(box, tileRect(k, 0));
    }
    box.style.display = "block";
  }
  function readout(k) {
    const r = $("#readout");
    view.hovered = k;
    r.dataset.index = k;
    if (k < 0) { r.textContent = "no tile here (not tissue, or not in the bag)"; return; }
    const info = view.info;
    r.textContent = "";
    r.append(el("div", `tile #${k} at level-0 (${info.x[k]}, ${info.y[k]}), ${Math.round(info.tile_size)} px`));
    const s = el("div", `attention ${info.score[k]}`); s.id = "readout-score"; r.append(s);
    r.append(el("div", `percentile ${(100 * info.percentile[k]).toFixed(1)} within the slide`));
    highlight(k);
  }

  // ---------------------------------------------------------------- overlays
  function opacity() { return $("#show-attention").checked ? $("#opacity").value / 100 : 0; }
  function addOverlay(scale) {
    const status = $("#scale-status");
    status.textContent = scale === "cohort" ? "computing the cohort scale (runs the models over every bag once)..." : "";
    if (view.overlay) view.viewer.world.removeItem(view.overlay);
    view.overlay = null;
    view.viewer.addTiledImage({
      tileSource: { type: "image", url: view.info.overlay[scale] }, x: 0, y: 0, width: 1, index: 1, opacity: opacity(),
      success: (e) => { view.overlay = e.item; status.textContent = ""; },
      error: () => { status.textContent = "the overlay could not be loaded (see the server's log)"; },
    });
    $("#scale-name").textContent = scale === "cohort" ? "percentile over the cohort's tiles" : "percentile within the slide";
  }
  function addTissue() {
    if (!view.info.tissue) { $("#show-tissue").disabled = true; $("#show-tissue").parentElement.title = "needs the slide file"; return; }
    view.viewer.addTiledImage({
      tileSource: { type: "image", url: view.info.tissue }, x: 0, y: 0, width: 1, opacity: $("#show-tissue").checked ? 1 : 0,
      success: (e) => { view.tissue = e.item; },
      error: () => { $("#show-tissue").disabled = true; },
    });
  }

  // ---------------------------------------------------------------- gallery
  function gallery(target, indices) {
    const info = view.info, box = $(target);
    for (const k of indices) {
      const fig = el("figure");
      fig.dataset.index = k;
      if (info.tile_url) {
        const img = el("img"); img.loading = "lazy"; img.alt = "tile " + k; img.src = info.tile_url + k + ".jpeg";
        fig.append(img);
      } else {
        fig.append(el("div", null, "nopixels"));
      }
      fig.append(el("figcaption", `#${k} \u00b7 ${info.score[k].toPrecision(3)} \u00b7 p${Math.round(100 * info.percentile[k])}`));
      fig.title = `tile #${k} at (${info.x[k]}, ${info.y[k]}): click to go there`;
      fig.addEventListener("click", () => { view.viewer.viewport.fitBounds(tileRect(k, 1.5)); readout(k); });
      box.append(fig);
    }
  }

  // ---------------------------------------------------------------- start
  async function start() {
    const res = await fetch(api);
    const info = await res.json();
    if (!res.ok) { notice(info.error || res.statusText); $("#slide-meta").textContent = ""; return; }
    view.info = info;
    buildIndex(info);
    document.title = "mil view: " + info.slide_id;
    $("#title").textContent = info.slide_id;
    const probs = Object.entries(info.probs).map(([c, p]) => `${c} ${p.toFixed(3)}`).join(", ");
    $("#slide-meta").textContent = `patient ${info.patient_id} \u00b7 ${info.x.length} tiles \u00b7 ${info.width}\u00d7${info.height} px` +
      ` \u00b7 ${info.model} attention, mean of ${info.n_models} model${info.n_models > 1 ? "s" : ""}` +
      (probs ? ` \u00b7 ensemble ${probs}` : "") + (info.class_name ? ` \u00b7 map of class ${info.class_name}` : "") +
      (info.other_slides.length ? ` \u00b7 patient bag with ${info.other_slides.join(", ")}` : "");
    if (!info.has_slide) notice("No slide pixels: " + info.message + ". The tiles' scores are drawn on a blank canvas in level-0 coordinates.");
    $("#colourbar").style.background = "linear-gradient(to right, " + info.colours.join(", ") + ")";
    $("#top-title").textContent = `Highest attention (top ${info.top.length})`;
    $("#bottom-title").textContent = `Lowest attention (bottom ${info.bottom.length})`;

    const base = info.dzi || {  // bags only: a blank canvas of the slide's level-0 size
      width: info.width, height: info.height, tileSize: 256, minLevel: 0,
      maxLevel: Math.ceil(Math.log2(Math.max(info.width, info.height))),
      getTileUrl: () => "/static/blank.png",
    };
    const viewer = OpenSeadragon({
      id: "viewer", prefixUrl: "/static/openseadragon/images/", tileSources: base, drawer: "canvas",
      showNavigator: true, navigatorPosition: "BOTTOM_LEFT", maxZoomPixelRatio: 4, imageSmoothingEnabled: false,
      gestureSettingsMouse: { clickToZoom: false }, timeout: 120000,
    });
    view.viewer = viewer;
    viewer.addOnceHandler("open", () => { addOverlay($("#scale").value); addTissue(); view.ready = true; });
    viewer.addHandler("open-failed", (e) => notice("the slide could not be opened: " + (e.message || "see the server's log")));
    new OpenSeadragon.MouseTracker({
      element: viewer.canvas,
      moveHandler: (e) => {
        const p = viewer.viewport.pointFromPixel(e.position, true);
        readout(tileAt(p.x * info.width, p.y * info.width));
      },
    });
    gallery("#top", info.top);
    gallery("#bottom", info.bottom);
  }

  $("#show-attention").addEventListener("change", () => view.overlay && view.overlay.setOpacity(opacity()));
  $("#opacity").addEventListener("input", () => view.overlay && view.overlay.setOpacity(opacity()));
  $("#scale").addEventListener("change", () => addOverlay($("#scale").value));
  $("#show-tissue").addEventListener("change", () => view.tissue && view.tissue.setOpacity($("#show-tissue").checked ? 1 : 0));
  start();
})();
