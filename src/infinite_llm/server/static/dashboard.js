// The live view of an infinite-llm server: reads /dashboard/feed every second and
// draws it. No libraries, nothing from any other host.
"use strict";

const REFRESH_MS = 1000;
const KEY_STORE = "infinite-llm-api-key";
const PALETTE = ["#3b6fd8", "#e59a2f", "#2f8f4e", "#c8312b", "#8e5cc9", "#17a2b8",
                 "#b8860b", "#d6449b"];
const SVG = "http://www.w3.org/2000/svg";

let apiKey = sessionStorage.getItem(KEY_STORE);
let timer = null;

function $(selector, root = document) { return root.querySelector(selector); }

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
                                      : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.setAttribute("class", v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function fmt(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits,
                                                 minimumFractionDigits: digits });
}

function ago(seconds) {
  if (seconds < 1) return "just now";
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  return `${Math.round(seconds / 60)} min ago`;
}

// -- fetching ------------------------------------------------------------------------

async function refresh() {
  const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
  let response;
  try {
    response = await fetch("/dashboard/feed", { headers, cache: "no-store" });
  } catch (error) {
    setStatus("down", "the server does not answer");
    return schedule();
  }
  if (response.status === 401) {
    askForKey(apiKey ? "that key was refused" : "");
    return;
  }
  if (!response.ok) {
    setStatus("down", `the feed answered ${response.status}`);
    return schedule();
  }
  const feed = await response.json();
  render(feed);
  setStatus("live", `live · refreshed ${new Date().toLocaleTimeString()}`);
  schedule();
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(refresh, REFRESH_MS);
}

function setStatus(kind, text) {
  const status = $("#status");
  status.className = `status ${kind}`;
  status.textContent = text;
}

function askForKey(error) {
  $("#main").hidden = true;
  const form = $("#key-form");
  form.hidden = false;
  $("#key-error").textContent = error;
  setStatus("down", "waiting for the API key");
  $("#key").focus();
}

// -- drawing -------------------------------------------------------------------------

function render(feed) {
  $("#key-form").hidden = true;
  $("#main").hidden = false;
  $("#model").textContent = feed.model;
  document.body.dataset.steps = feed.steps;
  $("#steps").textContent = fmt(feed.steps);
  const totals = feed.totals;
  for (const node of document.querySelectorAll("[data-total]")) {
    const k = node.dataset.total;
    node.textContent = k === "kv_usage" ? `${fmt(100 * totals[k], 1)}%` : fmt(totals[k]);
  }
  renderInstances(feed.instances);
  renderDebts(feed.instances, feed.debts);
  renderRequests(feed.requests, feed.running_requests);
  renderMigrations(feed.migrations);
  renderCharts(feed.series, feed.window_s);
}

function renderInstances(instances) {
  const box = $("#instances");
  for (const inst of instances) {
    let row = $(`[data-instance="${inst.id}"]`, box);
    if (!row) {
      row = el("div", { class: "instance", "data-instance": inst.id },
        el("div", { class: "head" },
          el("b", { text: `instance ${inst.id}` }),
          el("span", { class: "counts" },
            "own ", el("span", { "data-k": "own" }), " · lent ", el("span", { "data-k": "lent" }),
            " · free ", el("span", { "data-k": "free" }), " of ",
            el("span", { "data-k": "capacity" }), " · borrowed ",
            el("span", { "data-k": "borrowed" })),
          el("span", { class: "counts" },
            "batch ", el("span", { "data-k": "batch" }), " · waiting ",
            el("span", { "data-k": "waiting" }), " · ",
            el("span", { "data-k": "tokens_per_s" }), " tokens/s"),
          el("span", { class: "counts host" })),
        el("div", { class: "bar", role: "img" },
          el("div", { class: "seg own" }), el("div", { class: "seg lent" }),
          el("div", { class: "seg free" })),
        el("div", { class: "borrow" }));
      box.append(row);
    }
    row.classList.toggle("dead", !inst.alive);
    for (const k of ["own", "lent", "free", "capacity", "borrowed", "batch", "waiting"]) {
      $(`[data-k="${k}"]`, row).textContent = String(inst[k]);
    }
    $('[data-k="tokens_per_s"]', row).textContent = fmt(inst.tokens_per_s);
    $(".host", row).textContent = inst.host_capacity
      ? `host memory: ${inst.host_free} of ${inst.host_capacity} blocks free` : "";
    for (const k of ["own", "lent", "free"]) {
      $(`.seg.${k}`, row).style.width = `${100 * inst[k] / Math.max(1, inst.capacity)}%`;
    }
    $(".bar", row).setAttribute("aria-label",
      `${inst.own} own, ${inst.lent} lent, ${inst.free} free of ${inst.capacity} blocks`);
    const borrow = $(".borrow", row);
    borrow.style.width = `${Math.min(100, 100 * inst.borrowed / Math.max(1, inst.capacity))}%`;
    borrow.hidden = inst.borrowed === 0;
  }
  for (const row of box.querySelectorAll("[data-instance]")) {
    if (!instances.some((i) => String(i.id) === row.dataset.instance)) row.remove();
  }
}

function renderDebts(instances, debts) {
  const svg = $("#debts");
  svg.replaceChildren();
  const n = instances.length;
  const centre = 160, radius = n > 1 ? 115 : 0, r = 18;
  const at = {};
  instances.forEach((inst, k) => {
    const angle = -Math.PI / 2 + 2 * Math.PI * k / n;
    at[inst.id] = [centre + radius * Math.cos(angle), centre + radius * Math.sin(angle)];
  });
  const defs = el("svg:defs");
  for (const [id, fill] of [["arrow", "#6b7385"], ["arrow-cycle", "#c8312b"]]) {
    defs.append(el("svg:marker", { id, viewBox: "0 0 10 10", refX: 10, refY: 5,
                                  markerUnits: "userSpaceOnUse", markerWidth: 10,
                                  markerHeight: 10, orient: "auto-start-reverse" },
      el("svg:path", { d: "M0,0 L10,5 L0,10 z", fill })));
  }
  svg.append(defs);
  const heaviest = Math.max(1, ...debts.map((d) => d.blocks));
  for (const d of debts) {
    const [x1, y1] = at[d.debtor], [x2, y2] = at[d.creditor];
    const dx = x2 - x1, dy = y2 - y1, len = Math.hypot(dx, dy) || 1;
    // Bend each edge to its left, so that a -> b and b -> a do not overlap.
    const bend = 0.18 * len;
    const mx = (x1 + x2) / 2 - dy / len * bend, my = (y1 + y2) / 2 + dx / len * bend;
    const start = shorten(x1, y1, mx, my, r), end = shorten(x2, y2, mx, my, r + 2);
    const edge = el("svg:g", { class: `edge${d.in_cycle ? " cycle" : ""}`,
                               "data-debtor": d.debtor, "data-creditor": d.creditor },
      el("svg:path", {
        d: `M${start[0]},${start[1]} Q${mx},${my} ${end[0]},${end[1]}`,
        "stroke-width": 1 + 4 * d.blocks / heaviest,
        "marker-end": `url(#${d.in_cycle ? "arrow-cycle" : "arrow"})` }),
      el("svg:text", { x: (x1 + x2) / 4 + mx / 2, y: (y1 + y2) / 4 + my / 2 - 3,
                       "data-k": "blocks", text: String(d.blocks) }));
    svg.append(edge);
  }
  for (const inst of instances) {
    const [x, y] = at[inst.id];
    svg.append(el("svg:g", { class: "node", "data-node": inst.id },
      el("svg:circle", { cx: x, cy: y, r }),
      el("svg:text", { x, y, text: String(inst.id) })));
  }
  const cycles = debts.filter((d) => d.in_cycle).length;
  $("#debt-note").textContent = debts.length === 0 ? "nobody owes anybody"
    : `${debts.length} debt${debts.length > 1 ? "s" : ""}` +
      (cycles ? `; ${cycles} on a cycle (red), which DGFM cancels` : "");
}

function shorten(x, y, towardX, towardY, by) {
  const dx = towardX - x, dy = towardY - y, len = Math.hypot(dx, dy) || 1;
  return [x + dx / len * by, y + dy / len * by];
}

function renderRequests(requests, running) {
  const body = $("#requests tbody");
  body.replaceChildren(...requests.map((r) => {
    const owners = el("div", { class: "owners" });
    for (const [owner, blocks] of Object.entries(r.blocks)) {
      const home = Number(owner) === r.home;
      owners.append(el("span", { "data-owner": owner, class: home ? "home" : "away",
                                 title: home ? "at its home" : "on another instance",
                                 text: `${owner}: ${blocks}` }));
    }
    return el("tr", { "data-request": r.request_id },
      el("td", { class: "id", title: r.request_id, text: r.request_id }),
      el("td", { "data-k": "home", text: String(r.home) }),
      el("td", { "data-k": "num_tokens", text: String(r.num_tokens) }),
      el("td", {}, owners));
  }));
  $("#requests-note").textContent = running > requests.length
    ? `the ${requests.length} longest of ${running} running` : running ? "" : "none running";
}

function renderMigrations(events) {
  const list = $("#migrations");
  const what = { migrate: "migrate", recall: "recall", cycle: "cycle" };
  list.replaceChildren(...events.map((e) => el("li", { class: e.outcome },
    el("span", { class: "kind", text: what[e.kind] || e.kind }),
    `${e.blocks} block${e.blocks === 1 ? "" : "s"} of ${e.request_id}, ${e.source} → ${e.target}` +
    `${e.outcome === "aborted" ? " (aborted)" : ""} · step ${e.step} · ${ago(e.age_s)}`)));
  if (events.length === 0) list.append(el("li", { class: "muted", text: "none yet" }));
}

// -- charts --------------------------------------------------------------------------

const CHARTS = {
  rates: [["requests_per_s", "requests finished/s"], ["tokens_per_s", "tokens generated/s", true]],
  ttft: [["ttft_p50_ms", "p50"], ["ttft_p90_ms", "p90"], ["ttft_p99_ms", "p99"]],
  itl: [["itl_p50_ms", "p50"], ["itl_p90_ms", "p90"], ["itl_p99_ms", "p99"]],
  e2e: [["e2e_p50_ms", "p50"], ["e2e_p90_ms", "p90"], ["e2e_p99_ms", "p99"]],
  queue: [["running", "running"], ["waiting", "waiting"]],
  kv: [["kv_usage_pct", "KV in use, %"], ["preemptions_per_s", "preemptions/s", true]],
};

function renderCharts(series, windowS) {
  const points = series.map((p) => ({ ...p, kv_usage_pct: 100 * p.kv_usage }));
  for (const card of document.querySelectorAll("[data-chart]")) {
    const lines = CHARTS[card.dataset.chart];
    let svg = $("svg", card);
    if (!svg) {
      svg = el("svg:svg", { viewBox: "0 0 320 130", role: "img" });
      const legend = el("div", { class: "chart-legend" });
      lines.forEach(([key, label, right], k) => {
        const item = el("span", { text: label + (right ? " (right axis)" : "") });
        item.style.color = PALETTE[k];
        legend.append(item);
      });
      card.append(svg, legend);
      if (card.dataset.chart !== "rates" && card.dataset.chart !== "queue" &&
          card.dataset.chart !== "kv") {
        card.append(el("p", { class: "muted", text: `over the last ${windowS} s, every sample` }));
      }
    }
    drawChart(svg, points, lines);
  }
}

function drawChart(svg, points, lines) {
  svg.replaceChildren();
  const W = 320, H = 130, left = 34, right = 34, top = 6, bottom = 18;
  const span = Math.max(10, ...points.map((p) => p.age_s));
  const x = (age) => left + (W - left - right) * (1 - age / span);
  const axes = [false, true].map((onRight) => {
    const values = lines.filter((l) => !!l[2] === onRight)
      .flatMap(([key]) => points.map((p) => p[key])).filter((v) => v !== null && v !== undefined);
    const max = niceMax(Math.max(0, ...values));
    return { max, y: (v) => top + (H - top - bottom) * (1 - v / max), used: values.length > 0 };
  });
  svg.append(el("svg:line", { class: "axis", x1: left, y1: H - bottom, x2: W - right, y2: H - bottom }));
  svg.append(el("svg:text", { x: left, y: H - 4, text: ago(span) }));
  svg.append(el("svg:text", { x: W - right, y: H - 4, "text-anchor": "end", text: "now" }));
  axes.forEach((axis, onRight) => {
    if (!axis.used && onRight) return;
    const tx = onRight ? W - right + 3 : left - 3;
    const anchor = onRight ? "start" : "end";
    svg.append(el("svg:text", { x: tx, y: top + 8, "text-anchor": anchor, text: short(axis.max) }));
    svg.append(el("svg:text", { x: tx, y: H - bottom, "text-anchor": anchor, text: "0" }));
  });
  lines.forEach(([key, , onRight], k) => {
    const axis = axes[onRight ? 1 : 0];
    let d = "";
    let pen = "M";
    for (const p of points) {
      const v = p[key];
      if (v === null || v === undefined) { pen = "M"; continue; }
      d += `${pen}${x(p.age_s).toFixed(1)},${axis.y(v).toFixed(1)} `;
      pen = "L";
    }
    if (d) svg.append(el("svg:path", { class: "series", d, stroke: PALETTE[k], "data-series": key }));
  });
}

function niceMax(value) {
  if (value <= 0) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (value <= m * step) return m * step;
  return 10 * step;
}

function short(value) {
  if (value >= 1e6) return `${value / 1e6}M`;
  if (value >= 1e3) return `${value / 1e3}k`;
  return String(value);
}

// -- start ---------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = $("#key").value;
    sessionStorage.setItem(KEY_STORE, apiKey);
    refresh();
  });
  refresh();
});
