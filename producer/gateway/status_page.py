"""The status page: ``GET /`` serves one self-refreshing HTML page (no build
step) drawn from ``GET /v1/status``, the same report as ``tensorq status
--json`` (producer/ops/status.py): per model queue depth, pending, oldest
pending age, dead letters, rows/s, p50/p99 and the padding share over the
last minute with a sparkline; per worker device, alive, batches, mean batch size.

With ``[gateway] tokens`` a browser signs in once (``/login``, or
``/?token=``) and a session cookie then lets it read the page and
``/v1/status`` (producer/gateway/auth.py); when that cookie is gone the page
goes back to the sign-in form."""

from __future__ import annotations

from aiohttp import web

from producer.gateway.auth import LOGIN_PATH, login
from producer.gateway.state import GATEWAY
from producer.ops.status import collect_status


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", _page)
    router.add_get("/v1/status", _status)
    router.add_get(LOGIN_PATH, login)  # with tokens: the sign-in form (producer/gateway/auth.py)
    router.add_post(LOGIN_PATH, login)


async def _status(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    return web.json_response(await collect_status(gw.settings, redis=gw.redis))


async def _page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tensorq status</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; }
 h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
 table { border-collapse: collapse; } th, td { padding: 4px 12px; text-align: right; }
 th:first-child, td:first-child { text-align: left; }
 tr:nth-child(even) { background: #f4f6f8; } th { border-bottom: 1px solid #999; }
 .dead { color: #b00; } .no { color: #b00; font-weight: bold; } #updated { color: #777; }
 svg { vertical-align: middle; }
</style></head>
<body>
<h1>tensorq</h1><div id="updated">loading...</div>
<h2>Models</h2>
<table id="models"><thead><tr><th>model</th><th>queued</th><th>pending</th>
<th>oldest pending ms</th><th>dead letters</th><th>rows/s (1 min)</th><th>p50 ms</th>
<th>p99 ms</th><th>padding</th><th>last minute</th></tr></thead><tbody></tbody></table>
<h2>Workers</h2>
<table id="workers"><thead><tr><th>worker</th><th>device</th><th>alive</th><th>batches</th>
<th>mean batch</th><th>last seen s</th></tr></thead><tbody></tbody></table>
<script>
const cell = (attrs, text, cls) => {
  const td = document.createElement("td");
  for (const [k, v] of Object.entries(attrs)) td.dataset[k] = v;
  if (cls) td.className = cls;
  td.textContent = text;
  return td;
};
const spark = (values) => {
  const max = Math.max(1, ...values), w = 120, h = 24;
  const points = values.map((v, i) => `${(i * w) / (values.length - 1)},${h - (v / max) * h}`);
  return `<svg width="${w}" height="${h}"><polyline fill="none" stroke="#2a6" ` +
    `stroke-width="2" points="${points.join(" ")}"/></svg>`;
};
async function refresh() {
  try {
    const reply = await fetch("/v1/status", { headers: { Accept: "application/json" } });
    if (reply.status === 401) { window.location.assign("/login"); return; }
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    const report = await reply.json();
    const models = document.querySelector("#models tbody");
    models.replaceChildren();
    for (const [name, m] of Object.entries(report.models)) {
      const tr = document.createElement("tr");
      tr.append(cell({ model: name, field: "name" }, name));
      for (const f of ["queued", "pending", "oldest_pending_ms", "dead_letters",
                       "rows_per_s_1m", "p50_ms_1m", "p99_ms_1m"]) {
        const v = m[f];
        tr.append(cell({ model: name, field: f }, Number.isInteger(v) ? v : v.toFixed(1),
                       f === "dead_letters" && v > 0 ? "dead" : ""));
      }
      const share = m.padding_share_1m;  // null: no padded batches in the last minute
      tr.append(cell({ model: name, field: "padding_share_1m" },
                     share === null || share === undefined ? "-" : `${share.toFixed(2)}x`));
      const sparkCell = cell({ model: name, field: "spark" }, "");
      sparkCell.innerHTML = spark(m.spark_1m);
      tr.append(sparkCell);
      models.append(tr);
    }
    const workers = document.querySelector("#workers tbody");
    workers.replaceChildren();
    for (const w of report.workers) {
      const tr = document.createElement("tr");
      tr.append(cell({ worker: w.name, field: "name" }, w.name),
                cell({ worker: w.name, field: "device" }, w.device),
                cell({ worker: w.name, field: "alive" }, w.alive ? "yes" : "no",
                     w.alive ? "" : "no"),
                cell({ worker: w.name, field: "batches" }, w.batches),
                cell({ worker: w.name, field: "mean_batch_rows" }, w.mean_batch_rows.toFixed(1)),
                cell({ worker: w.name, field: "last_seen_s_ago" }, w.last_seen_s_ago.toFixed(1)));
      workers.append(tr);
    }
    document.getElementById("updated").textContent =
      "updated " + new Date().toLocaleTimeString() + " (every 2 s)";
    document.body.dataset.loaded = "yes";
  } catch (err) {
    document.getElementById("updated").textContent = "cannot load status: " + err;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body></html>
"""
