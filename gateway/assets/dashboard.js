// The lag dashboard: polls this gateway's /v1/dashboard every second, keeps
// 15 minutes of samples, and draws the tables and charts. Plain script with
// no libraries, so the binary serves every byte of it.
"use strict";

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"];
const POLL_MS = 1000;
const state = { started: undefined, since: 0, windowMs: 15 * 60 * 1000, samples: [], events: [], colors: {} };

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function colorOf(name) {
  if (!(name in state.colors)) state.colors[name] = COLORS[Object.keys(state.colors).length % COLORS.length];
  return state.colors[name];
}

function fmt(v, digits) {
  if (v === null || v === undefined || v < 0 || Number.isNaN(v)) return "–";
  return digits === undefined ? String(v) : v.toFixed(digits);
}

// Revisions per second for each region between its last two samples.
function applyRates() {
  const out = {};
  const n = state.samples.length;
  if (n < 2) return out;
  const a = state.samples[n - 2], b = state.samples[n - 1];
  const dt = (b.t_ms - a.t_ms) / 1000;
  for (const r of b.regions) {
    const before = a.regions.find((x) => x.name === r.name);
    if (before && dt > 0) out[r.name] = Math.max(0, (r.revision - before.revision) / dt);
  }
  return out;
}

function renderRegions(doc) {
  const latest = state.samples.length ? state.samples[state.samples.length - 1] : null;
  const rates = applyRates();
  const rows = doc.regions.map((r) => {
    const s = latest ? latest.regions.find((x) => x.name === r.name) : null;
    const lagRev = s ? s.lag_revisions : -1;
    const lagSec = s ? s.lag_seconds : r.staleness_seconds;
    const role = r.takes_writes ? "primary" : r.role;
    return `<tr data-region="${esc(r.name)}" data-role="${esc(role)}" data-healthy="${r.healthy}">` +
      `<td class="name">${esc(r.name)}${r.local ? " (here)" : ""}</td>` +
      `<td class="role role-${esc(role)}">${esc(role)}</td>` +
      `<td class="epoch">${esc(r.epoch)}</td>` +
      `<td class="health ${r.healthy ? "health-up" : "health-down"}">${r.healthy ? "healthy" : "down"}</td>` +
      `<td class="revision">${esc(r.revision)}</td>` +
      `<td class="lag-revisions" data-value="${lagRev}">${fmt(lagRev)}</td>` +
      `<td class="lag-seconds" data-value="${lagSec}">${fmt(lagSec, 2)}</td>` +
      `<td class="apply-rate">${r.name in rates ? rates[r.name].toFixed(0) : "–"}</td>` +
      `<td class="rtt">${fmt(r.rtt_ms, 1)}</td></tr>`;
  });
  document.querySelector("#regions tbody").innerHTML = rows.join("");
}

function renderRtt(doc) {
  const names = doc.regions.map((r) => r.name);
  const head = "<tr><th>from \\ to</th>" + names.map((n) => `<th>${esc(n)}</th>`).join("") + "</tr>";
  const rows = Object.keys(doc.rtt_ms).sort().map((from) => {
    const row = doc.rtt_ms[from];
    return `<tr data-from="${esc(from)}"><td>${esc(from)}</td>` +
      names.map((to) => `<td data-to="${esc(to)}">${fmt(row[to], 1)}</td>`).join("") + "</tr>";
  });
  document.querySelector("#rtt thead").innerHTML = head;
  document.querySelector("#rtt tbody").innerHTML = rows.join("");
}

function renderEvents() {
  const list = document.getElementById("events");
  if (!state.events.length) {
    list.innerHTML = '<li class="none">none in the last 15 minutes</li>';
    return;
  }
  list.innerHTML = state.events.slice().reverse().map((e) =>
    `<li class="${esc(e.kind)}" data-kind="${esc(e.kind)}" data-region="${esc(e.region)}">` +
    `${new Date(e.t_ms).toLocaleTimeString()} · ${esc(e.detail)}</li>`).join("");
}

// One line per region from `series` (name -> [[t_ms, value]]), failovers
// and outages as vertical marks. Each legend entry carries the series' last
// value and its peak in the window, for people and for tests.
function renderChart(id, series, unit) {
  const fig = document.getElementById(id);
  const W = 540, H = 190, L = 52, R = 8, T = 8, B = 22;
  const now = state.samples.length ? state.samples[state.samples.length - 1].t_ms : Date.now();
  const first = state.samples.length ? state.samples[0].t_ms : now;
  const t0 = Math.max(now - state.windowMs, Math.min(first, now - 60 * 1000));
  let peak = 0;
  for (const pts of Object.values(series)) for (const [, v] of pts) peak = Math.max(peak, v);
  const yMax = peak > 0 ? peak * 1.1 : 1;
  const x = (t) => L + ((t - t0) / Math.max(1, now - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / yMax) * (H - T - B);
  const parts = [`<svg width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img">`];
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    parts.push(`<line class="grid" x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}"/>`);
    parts.push(`<text x="${L - 4}" y="${y(v) + 4}" text-anchor="end">${v >= 100 ? v.toFixed(0) : v.toPrecision(2)}</text>`);
  }
  for (let i = 0; i <= 3; i++) {
    const t = t0 + ((now - t0) * i) / 3;
    const anchor = i === 0 ? "start" : i === 3 ? "end" : "middle";
    parts.push(`<text x="${x(t)}" y="${H - 6}" text-anchor="${anchor}">${new Date(t).toLocaleTimeString()}</text>`);
  }
  parts.push(`<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/>`);
  parts.push(`<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`);
  for (const e of state.events) {
    if (e.t_ms < t0 || (e.kind !== "failover" && e.kind !== "down")) continue;
    parts.push(`<line class="${e.kind === "failover" ? "failover" : "down"}" data-kind="${esc(e.kind)}" ` +
      `x1="${x(e.t_ms)}" x2="${x(e.t_ms)}" y1="${T}" y2="${H - B}"><title>${esc(e.detail)}</title></line>`);
  }
  const legend = [];
  for (const [name, pts] of Object.entries(series)) {
    const shown = pts.filter(([t]) => t >= t0);
    const c = colorOf(name);
    if (shown.length) {
      const d = shown.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      parts.push(`<polyline fill="none" stroke="${c}" stroke-width="1.8" points="${d}" data-region="${esc(name)}"/>`);
    }
    const last = shown.length ? shown[shown.length - 1][1] : -1;
    const top = shown.reduce((m, [, v]) => Math.max(m, v), 0);
    legend.push(`<li style="--c:${c}" data-region="${esc(name)}" data-last="${last}" data-peak="${top}">` +
      `${esc(name)}: ${fmt(last, unit === "s" ? 2 : 0)} ${unit} (peak ${fmt(top, unit === "s" ? 2 : 0)})</li>`);
  }
  parts.push("</svg>");
  fig.querySelector(".plot").innerHTML = parts.join("");
  fig.querySelector(".legend").innerHTML = legend.join("");
}

function renderCharts() {
  const lagRev = {}, lagSec = {}, rate = {};
  let prev = null;
  for (const s of state.samples) {
    for (const r of s.regions) {
      if (r.role !== "primary") {
        if (r.lag_revisions >= 0) (lagRev[r.name] = lagRev[r.name] || []).push([s.t_ms, r.lag_revisions]);
        if (r.lag_seconds >= 0) (lagSec[r.name] = lagSec[r.name] || []).push([s.t_ms, r.lag_seconds]);
      }
      const p = prev && prev.regions.find((x) => x.name === r.name);
      const dt = prev ? (s.t_ms - prev.t_ms) / 1000 : 0;
      if (p && dt > 0) (rate[r.name] = rate[r.name] || []).push([s.t_ms, Math.max(0, (r.revision - p.revision) / dt)]);
    }
    prev = s;
  }
  renderChart("chart-lag-revisions", lagRev, "revisions");
  renderChart("chart-lag-seconds", lagSec, "s");
  renderChart("chart-apply-rate", rate, "rev/s");
}

async function poll() {
  try {
    const resp = await fetch(`v1/dashboard?since=${state.since}`, { cache: "no-store" });
    if (!resp.ok) throw new Error(`the gateway answered ${resp.status}`);
    const doc = await resp.json();
    state.windowMs = doc.window_seconds * 1000;
    if (state.started !== doc.started_ms) {
      // A gateway (re)started: its numbering began again, so start over.
      const fresh = state.started === undefined;
      Object.assign(state, { started: doc.started_ms, since: 0, samples: [], events: [] });
      if (!fresh) return poll();
    }
    state.since = doc.seq;
    state.samples.push(...doc.samples);
    state.events.push(...doc.events);
    const oldest = doc.now_ms - state.windowMs;
    state.samples = state.samples.filter((s) => s.t_ms >= oldest);
    state.events = state.events.filter((e) => e.t_ms >= oldest);
    const primary = doc.regions.find((r) => r.takes_writes);
    document.getElementById("gateway").textContent = `· gateway ${doc.gateway} (${doc.region})`;
    document.getElementById("summary").textContent =
      (primary ? `writes go to ${primary.name} (epoch ${primary.epoch})` : "no primary region: writes are refused") +
      ` · updated ${new Date(doc.now_ms).toLocaleTimeString()}`;
    document.body.dataset.primary = primary ? primary.name : "";
    document.body.dataset.updated = String(doc.now_ms);
    renderRegions(doc);
    renderRtt(doc);
    renderCharts();
    renderEvents();
  } catch (err) {
    document.getElementById("summary").textContent = `the gateway does not answer (${err.message}); retrying`;
  }
}

poll();
setInterval(poll, POLL_MS);
