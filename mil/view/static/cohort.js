// Cohort page: one row per bag, sortable by any column, filtered by text and by error type.
"use strict";
(function () {
  const state = { rows: [], info: null, key: null, desc: false };
  const $ = (sel) => document.querySelector(sel);

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function fmt(p) { return p === null || p === undefined ? "" : p.toFixed(3); }

  function wrong(r) { return r.label !== null && r.called !== null && r.label !== r.called; }

  function keep(r) {
    const pos = state.info.positive;
    switch ($("#subset").value) {
      case "errors": return wrong(r);
      case "fn": return r.label === pos && r.called !== null && r.called !== pos;
      case "fp": return r.label !== null && r.label !== pos && r.called === pos;
      case "unlabelled": return r.label === null;
      default: return true;
    }
  }

  function matches(r, text) {
    if (!text) return true;
    const hay = [r.bag_id, r.patient_id, r.label, r.fold, r.called, ...r.slides].join(" ").toLowerCase();
    return text.toLowerCase().split(/\s+/).every((t) => hay.includes(t));
  }

  function compare(a, b) {
    const x = a[state.key], y = b[state.key];
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;  // blanks last either way
    if (y === null || y === undefined) return -1;
    const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
    return state.desc ? -c : c;
  }

  function render() {
    const body = $("#cohort tbody");
    body.replaceChildren();
    let rows = state.rows.filter((r) => keep(r) && matches(r, $("#filter").value.trim()));
    if (state.key) rows = rows.slice().sort(compare);
    for (const r of rows) {
      const tr = el("tr");
      if (wrong(r)) tr.className = "wrong";
      tr.append(el("td", r.bag_id), el("td", r.patient_id), el("td", r.label ?? "\u2014"), el("td", r.fold ?? "\u2014"));
      const p = el("td", fmt(r.prob), "num");
      if (r.prob !== null && r.prob !== undefined) {
        const bar = el("span", null, "bar");
        bar.style.width = Math.round(60 * r.prob) + "px";
        p.append(bar);
      }
      tr.append(p, el("td", r.called ?? "\u2014", "called"), el("td", String(r.n_tiles), "num"));
      const links = el("td");
      r.slides.forEach((s, i) => {
        const a = el("a", s);
        a.href = "/slide/" + encodeURIComponent(s);
        if (i) links.append(" ");
        links.append(a);
      });
      tr.append(links);
      body.append(tr);
    }
    $("#count").textContent = rows.length + " of " + state.rows.length + " bags";
    document.querySelectorAll("#cohort th[data-key]").forEach((th) => {
      th.classList.toggle("sorted-asc", th.dataset.key === state.key && !state.desc);
      th.classList.toggle("sorted-desc", th.dataset.key === state.key && state.desc);
    });
  }

  async function load() {
    const res = await fetch("/api/cohort");
    const info = await res.json();
    if (!res.ok) { $("#notices").append(el("p", info.error || res.statusText, "notice")); return; }
    state.info = info; state.rows = info.rows;
    $("#run-meta").textContent = `${info.run} \u00b7 ${info.model} (${info.n_models} model${info.n_models > 1 ? "s" : ""}) \u00b7 ` +
      `${info.task}${info.target ? " of " + info.target : ""} \u00b7 ${info.rows.length} ${info.bag_level} bags`;
    if (info.positive) $("#prob-head").textContent = "P(" + info.positive + ")";
    $("#notices").append(el("p", "Predictions: " + info.predictions, "status"));
    if (info.skipped.length) {
      const d = el("details"); d.append(el("summary", info.skipped.length + " rows of the cohort tables skipped"));
      const ul = el("ul"); info.skipped.forEach((s) => ul.append(el("li", `${s.kind} ${s.id}: ${s.reason}`)));
      d.append(ul); $("#skipped").append(d);
    }
    const params = new URLSearchParams(location.search);  // e.g. ?subset=fn&sort=prob
    if (params.get("subset")) $("#subset").value = params.get("subset");
    if (params.get("sort")) { state.key = params.get("sort"); state.desc = params.get("desc") === "1"; }
    render();
  }

  document.querySelectorAll("#cohort th[data-key]").forEach((th) => th.addEventListener("click", () => {
    state.desc = state.key === th.dataset.key ? !state.desc : false;
    state.key = th.dataset.key;
    render();
  }));
  $("#filter").addEventListener("input", render);
  $("#subset").addEventListener("change", () => {
    if ($("#subset").value === "fn") { state.key = "prob"; state.desc = false; }  // most confidently missed first
    if ($("#subset").value === "fp") { state.key = "prob"; state.desc = true; }
    render();
  });
  load();
})();
