"""Self-contained HTML views (no CDN, no network: the data and the script are inline).

``attention_page``: every (layer, head) attention map of an ``attention`` result, drawn on a canvas; pick the
layer and head, hover a cell to read query token, key token and weight.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from wrapperlab.training.checkpoint import atomic_write_text

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
#wrap {{ display: flex; gap: 1.5em; align-items: flex-start; }}
canvas {{ image-rendering: pixelated; border: 1px solid #ccc; }}
#info {{ font-family: monospace; min-height: 1.5em; }}
table {{ border-collapse: collapse; font-size: 12px; }} td, th {{ border: 1px solid #ddd; padding: 2px 6px; }}
</style></head><body>
<h1>{title}</h1>
<p>{subtitle}</p>
<p>layer <select id="layer"></select> head <select id="head"></select>
 colour scale 0 to <input id="vmax" type="number" value="0.5" step="0.1" min="0.05" max="1" style="width:4em"></p>
<div id="wrap"><canvas id="map" width="600" height="600"></canvas>
<div><div id="info">hover a cell</div><h3>attention of the last query by key token</h3>
<table id="mass"></table></div></div>
<script id="data" type="application/json">{data}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const cv = document.getElementById("map"), ctx = cv.getContext("2d");
const L = document.getElementById("layer"), H = document.getElementById("head"), V = document.getElementById("vmax");
D.layers.forEach((l, i) => L.add(new Option(String(l), String(i))));
for (let h = 0; h < D.heads; h++) H.add(new Option(String(h), String(h)));
const T = D.labels.length, cell = Math.max(2, Math.floor(600 / T));
cv.width = cv.height = cell * T;
function colour(v) {{
  const x = Math.max(0, Math.min(1, v / parseFloat(V.value)));
  const r = Math.round(255 * Math.min(1, 2 * x)), g = Math.round(255 * x * x), b = Math.round(120 * (1 - x));
  return `rgb(${{r}},${{g}},${{b}})`;
}}
function current() {{ return D.pattern[+L.value][+H.value]; }}
function draw() {{
  const P = current();
  for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {{
    ctx.fillStyle = colour(P[q][k]); ctx.fillRect(k * cell, q * cell, cell, cell);
  }}
  const tb = document.getElementById("mass"); tb.innerHTML = "<tr><th>key token</th><th>mass</th></tr>";
  const m = {{}}; const last = P[T - 1];
  for (let k = 0; k < T; k++) m[D.labels[k]] = (m[D.labels[k]] || 0) + last[k];
  Object.entries(m).sort((a, b) => b[1] - a[1]).slice(0, 12).forEach(([t, v]) => {{
    const tr = tb.insertRow(); tr.insertCell().textContent = t; tr.insertCell().textContent = v.toFixed(3);
  }});
}}
cv.addEventListener("mousemove", e => {{
  const r = cv.getBoundingClientRect();
  const k = Math.floor((e.clientX - r.left) / cell), q = Math.floor((e.clientY - r.top) / cell);
  if (q >= 0 && q < T && k >= 0 && k < T)
    document.getElementById("info").textContent =
      `query ${{q}} '${{D.labels[q]}}'  key ${{k}} '${{D.labels[k]}}'  weight ${{current()[q][k].toFixed(4)}}`;
}});
[L, H, V].forEach(el => el.addEventListener("change", draw));
draw();
</script></body></html>
"""


def attention_page(pattern: np.ndarray, labels: list[str], layers: list[int], path: str | Path, title: str,
                   subtitle: str = "") -> Path:
    """Write the interactive attention view. ``pattern``: (layers, heads, query, key)."""
    data = {"layers": list(layers), "heads": int(pattern.shape[1]), "labels": [str(x) for x in labels],
            "pattern": np.round(pattern.astype(float), 4).tolist()}
    blob = json.dumps(data).replace("</", "<\\/")  # cannot close the script element
    page = _PAGE.format(title=html.escape(title), subtitle=html.escape(subtitle), data=blob)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    return path
