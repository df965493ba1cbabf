"use strict";
const tokenInput = document.getElementById("token");
// The token stays in this tab only (sessionStorage) and is sent only to this server.
tokenInput.value = sessionStorage.getItem("courierToken") || "";
tokenInput.addEventListener("change", () => sessionStorage.setItem("courierToken", tokenInput.value));
const auth = () => ({ Authorization: "Bearer " + tokenInput.value });

// Outbox rows by status, as the cards name them: `in_flight` rows are claimed by some engine
// (published or about to be); "awaiting confirm" below is this engine's publishes the broker
// has not answered yet.
const states = [
  ["pending", "pending", "rows waiting to be claimed"],
  ["in_flight", "claimed (in flight)", "rows an engine holds: being published or awaiting its confirm (all engines)"],
  ["confirmed", "confirmed", "rows the broker confirmed (kept for retention.confirmed)"],
  ["retrying", "retrying", "rows waiting for their next attempt after a failure"],
];

function text(el, s) { el.textContent = s; return el; }
function cell(row, s, cls) { const td = document.createElement("td"); text(td, s); if (cls) td.className = cls; row.appendChild(td); return td; }

function card(k, v, title, why) {
  const d = document.createElement("div"); d.className = "card";
  const vv = document.createElement("div"); vv.className = "v"; text(vv, v);
  const kk = document.createElement("div"); kk.className = "k"; text(kk, k);
  d.append(vv, kk);
  if (title) d.title = title;
  if (why) { const w = document.createElement("div"); w.className = "why"; text(w, why); d.append(w); }
  return d;
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
    const oldest = card("oldest undelivered", age(s.oldest_pending_age_seconds),
      "age of the oldest row not yet confirmed", s.oldest ? s.oldest.reason : "nothing waiting");
    oldest.id = "oldestCard";
    if (s.oldest && s.oldest_pending_age_seconds > 60) oldest.classList.add("alert");
    cards.replaceChildren(
      ...states.map(([st, name, title]) => card(name, approx(s, st) + (s.outbox[st] ?? 0), title)),
      card("dead letters", approx(s, "dead_letters") + s.dead_letters, "rows in dead_letters, waiting for a person"),
      oldest,
      card("awaiting broker confirm", s.counters.in_flight, "this engine's publishes the broker has not acked or nacked yet"));
    await refreshRates();
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
      cell(tr, e.since_beat_ms < -1000 ? "in the future" : age(Math.max(e.since_beat_ms, 0) / 1000) + " ago"); cell(tr, e.holds); cell(tr, new Date(e.started_at).toLocaleString(undefined, { timeZoneName: "short" }));
      return tr;
    }));
  } catch (e) { text(document.getElementById("engCount"), "(unavailable)"); }
}

// The rate history is the server's (GET /api/rates), so a reload keeps it.
async function refreshRates() {
  try {
    const r = await fetch("/api/rates");
    drawRates(await r.json());
  } catch (e) { text(document.getElementById("ratesText"), "rates unavailable"); }
}

function rates(samples) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1], b = samples[i], dt = Math.max(b.t - a.t, 0.001);
    out.push({ t: b.t, pub: Math.max(0, (b.published - a.published) / dt), conf: Math.max(0, (b.confirmed - a.confirmed) / dt) });
  }
  return out;
}

// A round axis maximum: 1, 2 or 5 times a power of ten.
function niceMax(v) {
  const p = Math.pow(10, Math.floor(Math.log10(Math.max(v, 1))));
  return [1, 2, 5, 10].map(m => m * p).find(m => m >= v);
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.getHours().toString().padStart(2, "0") + ":" + d.getMinutes().toString().padStart(2, "0");
}

function drawRates(history) {
  const c = document.getElementById("rates"), g = c.getContext("2d");
  const rs = rates(history.samples || []);
  const span = 30 * 60, now = Date.now() / 1000;
  const left = 64, right = 16, top = 28, bottom = 28;
  const w = c.width - left - right, h = c.height - top - bottom;
  const max = niceMax(Math.max(10, ...rs.map(r => Math.max(r.pub, r.conf))));
  const x = t => left + w - ((now - t) / span) * w, y = v => top + h - (v / max) * h;
  g.clearRect(0, 0, c.width, c.height);
  g.font = "12px system-ui, sans-serif"; g.lineWidth = 1;
  // Axes, grid and their units.
  g.strokeStyle = "#dde"; g.fillStyle = "#556"; g.textAlign = "right"; g.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    g.beginPath(); g.moveTo(left, y(v)); g.lineTo(left + w, y(v)); g.stroke();
    g.fillText(v >= 1000 ? (v / 1000) + "k" : String(v), left - 6, y(v));
  }
  g.save(); g.translate(14, top + h / 2); g.rotate(-Math.PI / 2); g.textAlign = "center";
  g.fillText("messages / second", 0, 0); g.restore();
  g.textAlign = "center"; g.textBaseline = "top";
  for (let m = 0; m <= 30; m += 5) {
    const t = now - m * 60;
    g.fillText(m === 0 ? "now" : clock(t), x(t), top + h + 6);
  }
  g.strokeStyle = "#889"; g.beginPath(); g.moveTo(left, top); g.lineTo(left, top + h); g.lineTo(left + w, top + h); g.stroke();
  // The series: published solid blue, confirmed dashed green.
  const line = (key, color, dash) => {
    g.strokeStyle = color; g.lineWidth = 2; g.setLineDash(dash); g.beginPath();
    rs.forEach((r, i) => { i ? g.lineTo(x(r.t), y(r[key])) : g.moveTo(x(r.t), y(r[key])); });
    g.stroke(); g.setLineDash([]);
  };
  line("pub", "#2e86de", []); line("conf", "#1f8a4c", [6, 4]);
  g.textAlign = "left"; g.textBaseline = "middle"; g.lineWidth = 2;
  [["published", "#2e86de", []], ["confirmed", "#1f8a4c", [6, 4]]].forEach(([name, color, dash], i) => {
    const lx = left + 8 + i * 130;
    g.strokeStyle = color; g.setLineDash(dash); g.beginPath(); g.moveTo(lx, 12); g.lineTo(lx + 28, 12); g.stroke(); g.setLineDash([]);
    g.fillStyle = "#1d2330"; g.fillText(name, lx + 34, 12);
  });
  const last = rs[rs.length - 1] || { pub: 0, conf: 0 };
  text(document.getElementById("ratesText"),
    `now: published ${last.pub.toFixed(0)} msg/s, confirmed ${last.conf.toFixed(0)} msg/s; ` +
    `${rs.length} sample${rs.length === 1 ? "" : "s"} every ${history.interval_seconds || 2} s, kept by the server`);
}

async function act(id, method, path) {
  const notice = document.getElementById("notice");
  const r = await fetch(path, { method, headers: auth() });
  const body = await r.json().catch(() => ({}));
  text(notice, r.ok ? `${method === "POST" ? "requeued" : "discarded"} ${id}` : `error: ${body.error || r.status}`);
  await refreshDead();
}

// Payloads and headers need the token (admin or read-only); shown as text, never as HTML.
// The payload shown (the last one fetched) and how: text when it is UTF-8, else hex.
let shown = null;

function hexDump(bytes) {
  const lines = [];
  for (let off = 0; off < bytes.length; off += 16) {
    const row = bytes.slice(off, off + 16);
    const hex = Array.from(row, b => b.toString(16).padStart(2, "0")).join(" ");
    const ascii = Array.from(row, b => (b >= 32 && b < 127 ? String.fromCharCode(b) : ".")).join("");
    lines.push(off.toString(16).padStart(8, "0") + "  " + hex.padEnd(48) + "  " + ascii);
  }
  return lines.join("\n");
}

function renderPayload(mode) {
  if (!shown) return;
  const pre = document.getElementById("payload");
  const bytes = Uint8Array.from(atob(shown.payload_base64 || ""), ch => ch.charCodeAt(0));
  const asText = mode === "text" && shown.payload_text !== null && shown.payload_text !== undefined;
  const payload = asText ? shown.payload_text : hexDump(bytes);
  const headers = shown.headers_withheld ? "(headers too large to show)" : JSON.stringify(shown.headers, null, 2);
  text(pre, `headers: ${headers}\n\n${payload}`);
  pre.dataset.view = asText ? "text" : "hex";
  document.getElementById("asText").classList.toggle("on", asText);
  document.getElementById("asHex").classList.toggle("on", !asText);
  document.getElementById("asText").disabled = shown.payload_text === null || shown.payload_text === undefined;
}

// Payloads and headers need the token (admin or read-only); shown as text, never as HTML.
async function showPayload(id) {
  const title = document.getElementById("payloadTitle"), pre = document.getElementById("payload");
  const view = document.getElementById("payloadView");
  const r = await fetch(`/api/dead-letters/${id}/payload`, { headers: auth() });
  const body = await r.json().catch(() => ({}));
  title.className = ""; pre.className = "";
  if (!r.ok) {
    shown = null; view.className = "hidden";
    text(title, `payload of ${id}`); text(pre, `error: ${body.error || r.status} (enter a token)`); return;
  }
  shown = body; view.className = "";
  const cut = body.payload_truncated ? ` (first ${size(body.payload_base64.length * 3 / 4)} shown)` : "";
  text(title, `payload of ${id}: ${size(body.payload_bytes)}${cut}, ${body.content_type || "no content type"}`);
  renderPayload(body.payload_text !== null && body.payload_text !== undefined ? "text" : "hex");
}

document.getElementById("asText").onclick = () => renderPayload("text");
document.getElementById("asHex").onclick = () => renderPayload("hex");

async function refreshDead() {
  const tbody = document.getElementById("dead");
  try {
    const r = await fetch("/api/dead-letters?limit=200");
    const rows = await r.json();
    text(document.getElementById("dlCount"), `(${rows.length} shown)`);
    tbody.replaceChildren(...rows.map(d => {
      const tr = document.createElement("tr"); tr.dataset.id = d.id;
      cell(tr, d.id); cell(tr, d.exchange); cell(tr, d.routing_key); cell(tr, d.ordering_key || ""); cell(tr, d.attempts); cell(tr, size(d.payload_bytes));
      cell(tr, new Date(d.failed_at).toLocaleString(undefined, { timeZoneName: "short" })); cell(tr, d.last_error || "", "err").title = d.last_error || "";
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
