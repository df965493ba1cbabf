"use strict";
const tokenInput = document.getElementById("token");
// The token stays in this tab only (sessionStorage) and is sent only to this server.
tokenInput.value = sessionStorage.getItem("courierToken") || "";
tokenInput.addEventListener("change", () => sessionStorage.setItem("courierToken", tokenInput.value));
const auth = () => ({ Authorization: "Bearer " + tokenInput.value });

const history = []; // {t, published, confirmed}
const states = ["pending", "in_flight", "confirmed", "retrying"];

function text(el, s) { el.textContent = s; return el; }
function cell(row, s, cls) { const td = document.createElement("td"); text(td, s); if (cls) td.className = cls; row.appendChild(td); return td; }

function card(k, v) {
  const d = document.createElement("div"); d.className = "card";
  const vv = document.createElement("div"); vv.className = "v"; text(vv, v);
  const kk = document.createElement("div"); kk.className = "k"; text(kk, k);
  d.append(vv, kk); return d;
}

// Counts past 10,000 are estimates: say so.
function approx(s, key) { return (s.approximate || []).includes(key) ? "≈ " : ""; }

function size(n) {
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}

function age(s) {
  if (s === null || s === undefined) return "none";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

async function refreshStats() {
  const cards = document.getElementById("cards");
  try {
    const r = await fetch("/api/stats");
    const s = await r.json();
    cards.replaceChildren(
      ...states.map(st => card(st.replace("_", " "), approx(s, st) + (s.outbox[st] ?? 0))),
      card("dead letters", approx(s, "dead_letters") + s.dead_letters),
      card("oldest pending", age(s.oldest_pending_age_seconds)),
      card("awaiting confirm", s.counters.in_flight));
    history.push({ t: Date.now() / 1000, published: s.counters.published, confirmed: s.counters.confirmed });
    while (history.length > 300) history.shift();
    drawRates();
  } catch (e) { cards.replaceChildren(card("stats", "unavailable")); }
  try {
    const r = await fetch("/ready");
    const s = await r.json();
    const db = document.getElementById("db"), br = document.getElementById("broker");
    text(db, s.database).className = "pill " + (s.database === "connected" ? "ok" : "bad");
    text(br, s.broker).className = "pill " + (s.broker === "connected" ? "ok" : s.broker === "blocked" ? "warn" : "bad");
  } catch (e) { /* engine unreachable: leave the pills as they are */ }
}

// The registry: who is running, how long since each beat, what each holds.
async function refreshEngines() {
  const tbody = document.getElementById("engines");
  try {
    const r = await fetch("/api/engines");
    const rows = await r.json();
    const running = rows.filter(e => e.state === "running").length;
    text(document.getElementById("engCount"), `(${running} running, ${rows.length - running} dead)`);
    tbody.replaceChildren(...rows.map(e => {
      const tr = document.createElement("tr"); tr.dataset.engine = e.id;
      cell(tr, e.id); cell(tr, e.host); cell(tr, e.pid); cell(tr, e.version);
      const st = document.createElement("span"); text(st, e.state).className = "pill " + (e.state === "running" ? "ok" : "bad");
      cell(tr, "", "state").append(st);
      cell(tr, age(e.since_beat_ms / 1000) + " ago"); cell(tr, e.holds); cell(tr, new Date(e.started_at).toLocaleString());
      return tr;
    }));
  } catch (e) { text(document.getElementById("engCount"), "(unavailable)"); }
}

function rates() {
  const out = [];
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i], dt = Math.max(b.t - a.t, 0.001);
    out.push({ pub: (b.published - a.published) / dt, conf: (b.confirmed - a.confirmed) / dt });
  }
  return out;
}

function drawRates() {
  const c = document.getElementById("rates"), g = c.getContext("2d");
  const rs = rates();
  g.clearRect(0, 0, c.width, c.height);
  const max = Math.max(10, ...rs.map(r => Math.max(r.pub, r.conf)));
  const line = (key, color) => {
    g.strokeStyle = color; g.beginPath();
    rs.forEach((r, i) => {
      const x = c.width - (rs.length - i) * (c.width / 300), y = c.height - 10 - (r[key] / max) * (c.height - 20);
      i ? g.lineTo(x, y) : g.moveTo(x, y);
    });
    g.stroke();
  };
  line("pub", "#2e86de"); line("conf", "#1f8a4c");
  const last = rs[rs.length - 1] || { pub: 0, conf: 0 };
  text(document.getElementById("ratesText"),
    `publish ${last.pub.toFixed(0)} msg/s (blue) · confirm ${last.conf.toFixed(0)} msg/s (green) · last ${Math.round(history.length * 2 / 60)} min, scale 0–${max.toFixed(0)} msg/s`);
}

async function act(id, method, path) {
  const notice = document.getElementById("notice");
  const r = await fetch(path, { method, headers: auth() });
  const body = await r.json().catch(() => ({}));
  text(notice, r.ok ? `${method === "POST" ? "requeued" : "discarded"} ${id}` : `error: ${body.error || r.status}`);
  await refreshDead();
}

// Payloads and headers need the token (admin or read-only); shown as text, never as HTML.
async function showPayload(id) {
  const title = document.getElementById("payloadTitle"), pre = document.getElementById("payload");
  const r = await fetch(`/api/dead-letters/${id}/payload`, { headers: auth() });
  const body = await r.json().catch(() => ({}));
  title.className = ""; pre.className = "";
  if (!r.ok) { text(title, `payload of ${id}`); text(pre, `error: ${body.error || r.status} (enter a token)`); return; }
  const cut = body.payload_truncated ? ` (first ${size(body.payload_base64.length * 3 / 4)} shown)` : "";
  text(title, `payload of ${id}: ${size(body.payload_bytes)}${cut}, ${body.content_type || "no content type"}`);
  const payload = body.payload_text ?? ("base64: " + body.payload_base64);
  const headers = body.headers_withheld ? "(headers too large to show)" : JSON.stringify(body.headers, null, 2);
  text(pre, `headers: ${headers}\n\n${payload}`);
}

async function refreshDead() {
  const tbody = document.getElementById("dead");
  try {
    const r = await fetch("/api/dead-letters?limit=200");
    const rows = await r.json();
    text(document.getElementById("dlCount"), `(${rows.length} shown)`);
    tbody.replaceChildren(...rows.map(d => {
      const tr = document.createElement("tr"); tr.dataset.id = d.id;
      cell(tr, d.id); cell(tr, d.exchange); cell(tr, d.routing_key); cell(tr, d.ordering_key || ""); cell(tr, d.attempts); cell(tr, size(d.payload_bytes));
      cell(tr, new Date(d.failed_at).toLocaleString()); cell(tr, d.last_error || "", "err").title = d.last_error || "";
      const td = cell(tr, "");
      const rq = document.createElement("button"); text(rq, "requeue"); rq.className = "requeue";
      rq.onclick = () => act(d.id, "POST", `/api/dead-letters/${d.id}/requeue`);
      const ds = document.createElement("button"); text(ds, "discard"); ds.className = "discard";
      ds.onclick = () => { if (confirm(`Discard ${d.id} for good?`)) act(d.id, "DELETE", `/api/dead-letters/${d.id}`); };
      const pl = document.createElement("button"); text(pl, "payload"); pl.className = "payload";
      pl.onclick = () => showPayload(d.id);
      td.append(pl, " ", rq, " ", ds);
      return tr;
    }));
  } catch (e) { text(document.getElementById("dlCount"), "(unavailable)"); }
}

refreshStats(); refreshEngines(); refreshDead();
setInterval(refreshStats, 2000);
setInterval(refreshEngines, 2000);
setInterval(refreshDead, 10000);
