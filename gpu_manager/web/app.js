// The dashboard: reads /gpu/status, /gpu/operations and /gpu/history, follows /gpu/events
// (EventSource resumes by itself with Last-Event-ID), and sends the same calls as the CLI.
// No framework and no build step: the daemon serves these files as they are.
import { el, fmtMB, ago, hue, fetchJSON, token, TOKEN_KEY } from "/ui/util.js";

const FALLBACK_MS = 10000; // a slow poll in case the event stream is down
const MAX_EVENTS = 200;
const STATES = ["stopped", "starting", "ready", "unhealthy", "stopping", "failed",
                "sleeping", "waking"];
const KINDS = ["state", "operation", "step", "lease", "restart_scheduled", "sleep_fallback",
               "gap", "shutdown"];

const page = {
  status: null, ops: [], events: [], history: [], chart: null,
  needsToken: false, busy: new Set(), refreshTimer: null, lastSample: 0,
};

// ---- the API ----------------------------------------------------------------------------

async function api(path, options = {}) {
  const res = await fetchJSON(path, options);
  if (res.status === 401) {
    page.needsToken = true;
    renderTokenState();
  }
  return res;
}

function scheduleRefresh(ops = false) {
  if (ops) page.opsDirty = true;
  if (page.refreshTimer) return;
  // events come in bursts (a transition publishes a dozen): one refresh per burst
  page.refreshTimer = setTimeout(() => { page.refreshTimer = null; refresh(); }, 120);
}

async function refresh() {
  const st = await api("/gpu/status");
  if (st.ok) {
    page.status = st.body;
    addSample(st.body);
    render();
  }
  if (page.opsDirty || !page.ops.length) {
    page.opsDirty = false;
    const ops = await api("/gpu/operations?limit=8");
    if (ops.ok) { page.ops = ops.body.operations; renderOps(); }
  }
}

// ---- notices ----------------------------------------------------------------------------

function notice(kind, title, lines = []) {
  const box = document.getElementById("notice");
  box.replaceChildren(el("strong", {}, title),
                      ...lines.map(l => el("div", {}, l)),
                      el("button", { type: "button", class: "close", "aria-label": "Dismiss",
                                     onclick: () => { box.hidden = true; } }, "×"));
  box.className = kind;
  box.hidden = false;
}

function explain(res) {
  const b = res.body || {};
  const lines = [typeof b.detail === "string" ? b.detail : JSON.stringify(b.detail ?? b)];
  // a refused run carries them at the top, a refused dry run in its plan
  const plan = b.plan && b.plan.ok === false ? b.plan : b;
  if (plan.short_mb) lines.push(`Short by ${fmtMB(plan.short_mb)}.`);
  for (const x of plan.blockers || []) {
    const on = x.device != null ? ` on GPU ${x.device}` : "";
    lines.push(`Blocked by ${x.name}${on} (${fmtMB(x.mb)}): ${x.reason}`);
  }
  return { title: `Refused (${res.status} ${b.error || ""})`, lines };
}

async function act(label, path) {
  if (page.busy.has(path)) return;
  page.busy.add(path);
  render();
  try {
    const res = await api(path, { method: "POST" });
    if (res.ok) {
      notice("ok", `${label}: done`, []);
    } else {
      const { title, lines } = explain(res);
      notice("error", `${label}: ${title}`, lines);
    }
  } catch (err) {
    notice("error", `${label}: no answer`, [String(err)]);
  } finally {
    page.busy.delete(path);
    scheduleRefresh(true);
  }
}

// ---- rendering --------------------------------------------------------------------------

function render() {
  if (!page.status) return;
  renderGpu();
  renderServices();
  renderPhases();
  renderLock();
  renderFilter();
}

function renderGpu() {
  const v = page.status.vram || {};
  const all = page.status.gpus;  // every managed card (the page ships with its daemon)
  const several = all.length > 1;
  const blocks = all.map(g => {
    const total = g.total_mb || 0;
    const label = `GPU ${g.index}${g.name ? ` · ${g.name}` : ""}`;
    const bar = el("div", { class: "bar", role: "img", "data-gpu": g.index,
                            "aria-label": `${label} VRAM: ${fmtMB(g.used_mb)} of ` +
                                          `${fmtMB(total)} used` });
    const parts = [];
    for (const [name, mb] of Object.entries(g.services || {})) {
      if (mb) parts.push({ label: name, mb, color: hue(name) });
    }
    if (g.foreign_mb) parts.push({ label: "foreign", mb: g.foreign_mb, cls: "foreign" });
    if (g.reserve_mb) parts.push({ label: "reserve", mb: g.reserve_mb, cls: "reserve" });
    for (const p of parts) {
      const seg = el("span", { class: `seg ${p.cls || ""}`,
                               title: `${p.label}: ${fmtMB(p.mb)}` },
                     p.mb / total > 0.08 ? p.label : "");
      seg.style.width = `${total ? (100 * p.mb) / total : 0}%`;
      if (p.color) seg.style.background = p.color;
      bar.append(seg);
    }
    const facts = el("dl", { class: "facts" },
      ...fact("Total", fmtMB(total)), ...fact("Used", fmtMB(g.used_mb)),
      ...fact("Free", fmtMB(g.free_mb)), ...fact("Available", fmtMB(g.available_mb)),
      ...(g.foreign_mb != null ? fact("Foreign", fmtMB(g.foreign_mb)) : []),
      ...(g.temperature_c != null ? fact("Temperature", `${g.temperature_c} °C`) : []),
      ...(g.utilization_percent != null
            ? fact("Utilisation", `${g.utilization_percent} %`) : []));
    return el("div", { class: "card", "data-gpu": g.index },
      el("h3", { class: "card-label" }, label), bar, facts);
  });
  // the host RAM that sleeping services fill (weights out of VRAM), and what is left
  const host = page.status.host;
  const probe = el("dl", { class: "facts probe" },
    ...fact("Probe", (v.source ?? "–") + (v.error ? ` (${v.error})` : "")),
    ...(several && page.status.placement ? fact("Placement", page.status.placement) : []),
    ...(host ? fact("Host RAM held by sleepers", fmtMB(host.held_by_sleepers_mb)) : []),
    ...(host && host.ram_free_mb != null
          ? fact("Host RAM free for sleeps", fmtMB(Math.max(0, host.ram_free_mb))) : []));
  const body = document.getElementById("gpu-body");
  body.classList.toggle("several", several);
  body.replaceChildren(...blocks, probe);
  // with several cards the chart draws each card's used memory
  const note = document.getElementById("chart-note");
  note.hidden = !several;
  note.textContent = several ? "VRAM used over the last 15 minutes, a line per GPU" : "";
  drawChart();
}

// Card indices as text: "0", "0,1"; "" when none.
function cardList(devices) { return (devices || []).join(","); }

// "on GPU 1" / "on GPUs 0,1" for a step or lease that names its cards; "" otherwise.
function onCards(devices) {
  if (!devices || !devices.length) return "";
  return ` on GPU${devices.length > 1 ? "s" : ""} ${cardList(devices)}`;
}

function fact(name, value) { return [el("dt", {}, name), el("dd", {}, value)]; }

function renderServices() {
  const rows = [];
  const canAct = !page.needsToken || !!token();
  for (const [name, s] of Object.entries(page.status.services)) {
    const buttons = [["start", "Start"], ["stop", "Stop"]];
    if (s.sleep) buttons.push(["sleep", "Sleep"]);
    const actions = buttons.map(([verb, label]) => {
      const path = `/gpu/service/${encodeURIComponent(name)}/${verb}`;
      return el("button", {
        type: "button", "data-action": verb, "data-service": name,
        disabled: !canAct || page.busy.has(path),
        title: canAct ? `${label} ${name}` : "Enter the token to act",
        onclick: () => act(`${label} ${name}`, path),
      }, label);
    });
    const up = ["ready", "unhealthy", "sleeping"].includes(s.state) ? ago(s.since) : "";
    // data-label: on a phone each row is a card, and the cell says what it is
    const cell = (label, cls, ...content) => el("td", { class: cls, "data-label": label },
                                                ...content);
    rows.push(el("tr", { "data-service": name },
      el("th", { scope: "row" }, name),
      cell("State", "", el("span", { class: `state state-${s.state}` }, s.state),
           s.prewarmed ? el("span", { class: "state prewarmed" }, "prewarmed") : ""),
      cell("Declared", "num", fmtMB(s.vram_mb)),
      cell("Measured", "num", s.measured_mb != null ? fmtMB(s.measured_mb) : "–"),
      cell("Priority", "num", String(s.priority)),
      cell("GPU", "gpu", gpuCell(s)),
      cell("Phases", "", s.phases.join(", ")),
      cell("PIDs", "", s.pids.join(" ")),
      cell("Up", "", up),
      cell("Restarts", "num", String(s.restarts)),
      cell("Requests", "small", requestsCell(s.serve)),
      cell("Health", "small", [s.health, s.last_exit].filter(Boolean).join(" · ")
                              || s.reason || ""),
      cell("Costs", "small", costsCell(s)),
      cell("Actions", "actions", ...actions)));
  }
  document.querySelector("#services-table tbody").replaceChildren(...rows);
}

// What a service's releases and returns have cost (learned medians), what its sleep holds
// in host RAM, and why it cannot sleep here when it cannot.
function costsCell(s) {
  const parts = [];
  for (const [kind, c] of Object.entries(s.costs || {})) {
    parts.push(`${kind} ${c.p50_s < 10 ? c.p50_s.toFixed(2) : Math.round(c.p50_s)}s`);
  }
  if (s.host_ram_mb) parts.push(`asleep: ${fmtMB(s.host_ram_mb)} RAM` +
                                (s.host_ram_measured ? "" : " (declared)"));
  if (s.sleep_unavailable) parts.push(`cannot sleep: ${s.sleep_unavailable}`);
  return parts.join(" · ") || "–";
}

// The front door's figures for a served service: in flight, waiting, the last request, the
// starts its requests caused and the idle timer (by measure: the utilisation it goes by).
function requestsCell(serve) {
  if (!serve) return "–";
  const parts = [`${serve.in_flight} in flight`, `${serve.waiting} waiting`];
  if (serve.draining) parts.push("draining");
  if (serve.last_request_at != null) parts.push(`last ${ago(serve.last_request_at)} ago`);
  if (serve.request_starts) parts.push(`${serve.request_starts} started by requests`);
  const idle = serve.idle;
  if (idle && idle.idle_for_s != null) {
    const util = idle.util_pct != null ? `, ${idle.util_pct}% (${idle.util_source})` : "";
    parts.push(`idle ${Math.round(idle.idle_for_s)}s of ${idle.after_s}s${util}`);
  }
  return parts.join(" · ");
}

// The cards a service runs (or last ran) on, what it may use and how many it needs at once.
function gpuCell(s) {
  const pinned = s.allowed_devices != null;
  const allowed = pinned ? `pinned to GPU ${cardList(s.allowed_devices)}` : "any card";
  const need = (s.gpus || 1) > 1 ? `; needs ${s.gpus} cards at once` : "";
  const now = cardList(s.devices);
  const title = `${now ? `on GPU ${now}` : "not placed"}; may use ${allowed}${need}`;
  const extra = [pinned ? `pin ${cardList(s.allowed_devices)}` : "",
                 (s.gpus || 1) > 1 ? `×${s.gpus}` : ""].filter(Boolean).join(" ");
  return el("span", { title, class: "gpu-cell" }, now || (pinned ? "" : "any"),
            extra ? el("span", { class: "muted small" }, ` (${extra})`) : "");
}

function renderPhases() {
  const current = page.status.phase;
  const canAct = !page.needsToken || !!token();
  const items = Object.entries(page.status.phases || {}).map(([n, p]) => {
    const prepare = `/gpu/prepare-phase/${n}`;
    return el("li", { class: Number(n) === current ? "current" : "", "data-phase": n },
      el("span", { class: "phase-name" }, `${n}. ${p.name || "phase " + n}`),
      Number(n) === current ? el("span", { class: "pill" }, "current") : "",
      el("span", { class: "muted small" },
         [p.services.join(", "), p.keep.length ? `keeps ${p.keep.join(", ")}` : ""]
           .filter(Boolean).join(" · ")),
      el("span", { class: "grow" }),
      el("button", { type: "button", "data-preview": n, disabled: !canAct,
                     onclick: () => preview(n) }, "Preview"),
      el("button", { type: "button", "data-prepare": n,
                     disabled: !canAct || page.busy.has(prepare),
                     onclick: () => act(`Prepare phase ${n}`, prepare) }, "Prepare"));
  });
  document.getElementById("phase-list").replaceChildren(...items);
}

async function preview(n) {
  const res = await api(`/gpu/prepare-phase/${n}?dry_run=true`, { method: "POST" });
  const box = document.getElementById("preview");
  if (!res.ok) {
    const { title, lines } = explain(res);
    box.replaceChildren(el("strong", {}, `Phase ${n}: ${title}`),
                        ...lines.map(l => el("div", {}, l)));
    return;
  }
  const plan = res.body.plan;
  const steps = plan.steps.map((s, i) => el("li", {},
    el("span", { class: `verb verb-${s.action}` }, s.action), ` ${s.service}${onCards(s.devices)} `,
    el("span", { class: "muted" }, `${fmtMB(s.mb)} · ${s.reason}`),
    s.after.length ? el("span", { class: "muted" }, ` · after step ${s.after.map(a => a + 1)
                                                                       .join(", ")}`) : ""));
  box.replaceChildren(
    el("strong", {}, `Phase ${n} would: `),
    steps.length ? el("ol", { class: "steps" }, ...steps) : el("span", {}, "change nothing"),
    el("div", { class: "muted small" },
       `${fmtMB(plan.used_before_mb)} → ${fmtMB(plan.used_after_mb)} of ` +
       `${fmtMB(plan.budget_mb)}`));
}

function renderLock() {
  const l = page.status.lock;
  const h = l.held_for;
  const who = {
    none: "free", unknown: "unknown (backend not answering)",
    operation: `operation ${h.operations.map(o => `${o.label} (${o.id})`).join(", ")}`,
    leases: `client leases: ${h.leases.join(", ")}`, daemon: "the daemon",
    legacy: `legacy holder ${h.legacy}`, releasing: "being released",
  }[h.kind] || h.kind;
  const leases = page.status.leases.map(x => el("li", {},
    `${x.session_id} · ${x.requester} · ${x.vram_mb != null ? fmtMB(x.vram_mb) : "all"}` +
    ` · priority ${x.priority}` +
    ((x.devices || []).length ? ` · GPU ${cardList(x.devices)}` : "")));
  document.getElementById("lock-body").replaceChildren(
    el("dl", { class: "facts" },
       ...fact("Held by", who),
       ...fact("TTL", l.ttl != null ? `${l.ttl.toFixed(1)} s` : "–"),
       ...fact("Backend", `${l.backend}${l.ok ? "" : ` (${l.error})`}`),
       ...fact("Queue", [page.status.operations.length
                           ? `${page.status.operations.length} operation(s) in flight` : "",
                         (page.status.waiting || []).length
                           ? `waiting: ${page.status.waiting.join(", ")}` : ""]
                          .filter(Boolean).join("; ") || "empty")),
    leases.length ? el("ul", { class: "leases" }, ...leases)
                  : el("p", { class: "muted" }, "No client leases."));
}

function renderOps() {
  const items = [...page.ops].reverse().map(op => {
    const total = op.duration_s || 0;
    const req = op.request;
    const what = req.kind + (req.phase != null ? ` ${req.phase}` : "") +
                 (req.name ? ` ${req.name}` : "");
    const lanes = op.steps.map(s => {
      const lane = el("div", { class: "lane" },
        el("span", { class: "lane-label" },
           `${s.action} ${s.service}${onCards(s.devices)} ` +
           `${s.duration_s != null ? s.duration_s.toFixed(2) + " s" : ""}`));
      if (total > 0 && s.started_at != null && op.started_at != null) {
        const track = el("div", { class: "track" });
        const start = Math.max(0, s.started_at - op.started_at);
        const bar = el("span", { class: `span verb-${s.action} status-${s.status}`,
                                 title: `${s.action} ${s.service}${onCards(s.devices)}: ` +
                                        `${s.status}` +
                                        (s.reclaim_wait_s ? `, waited ${s.reclaim_wait_s
                                          .toFixed(2)} s for VRAM` : "") });
        bar.style.marginLeft = `${(100 * start) / total}%`;
        bar.style.width = `${Math.max(1, (100 * (s.duration_s || 0)) / total)}%`;
        if (s.reclaim_wait_s && s.duration_s) {
          const wait = el("span", { class: "wait" });
          wait.style.width = `${(100 * s.reclaim_wait_s) / s.duration_s}%`;
          bar.append(wait);
        }
        track.append(bar);
        lane.append(track);
      }
      return lane;
    });
    return el("article", { class: `op op-${op.status}`, "data-op": op.id },
      el("header", {}, el("strong", {}, what), " ",
         el("span", { class: `state status-${op.status}` }, op.status), " ",
         el("span", { class: "muted small" },
            `${total ? total.toFixed(2) + " s · " : ""}${ago(op.created_at)} ago · ${op.id}`)),
      op.error ? el("div", { class: "small error-text" },
                    typeof op.error === "string" ? op.error
                                                 : op.error.detail || JSON.stringify(op.error))
               : "",
      ...lanes);
  });
  document.getElementById("ops-body").replaceChildren(
    ...(items.length ? items : [el("p", { class: "muted" }, "No operations yet.")]));
}

function renderFilter() {
  const select = document.getElementById("event-filter");
  const names = Object.keys(page.status.services);
  const have = [...select.options].map(o => o.value).filter(Boolean);
  if (have.join() !== names.join()) {
    const value = select.value;
    select.replaceChildren(el("option", { value: "" }, "all"),
                           ...names.map(n => el("option", { value: n }, n)));
    select.value = value;
  }
}

function renderEvents() {
  const only = document.getElementById("event-filter").value;
  const items = page.events.filter(e => !only || e.service === only).slice(-80).reverse()
    .map(e => el("li", { class: `ev ev-${e.kind}` },
      el("time", {}, new Date(e.at * 1000).toLocaleTimeString()), " ",
      el("span", { class: "kind" }, e.kind), " ",
      e.service ? el("strong", {}, e.service) : "", " ", describe(e)));
  document.getElementById("event-log").replaceChildren(...items);
}

function describe(e) {
  switch (e.kind) {
    case "state": return `${e.previous ?? "?"} → ${e.state}${e.reason ? ` (${e.reason})` : ""}`;
    case "operation": return `${e.request ? e.request.kind : ""} ${e.status}` +
                             (e.duration_s ? ` in ${e.duration_s.toFixed(2)} s` : "");
    case "step": return `${e.action} ${e.status}${e.duration_s ? ` ${e.duration_s.toFixed(2)} s` : ""}`;
    case "gap": return `missed events (${e.reason}); refreshed`;
    default: return Object.entries(e).filter(([k]) => !["kind", "service", "at", "event_id"]
      .includes(k)).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`)
      .join(" ");
  }
}

// ---- the chart ---------------------------------------------------------------------------

// page.history: [{at, cards: {index: {used_mb, foreign_mb, total_mb}}}], oldest first.
function addSample(st) {
  const at = st && st.vram ? st.vram.updated_at : null;
  if (at == null || at <= page.lastSample) return;
  page.lastSample = at;
  const cards = {};
  for (const g of st.gpus || []) {
    cards[g.index] = { used_mb: g.used_mb, foreign_mb: g.foreign_mb, total_mb: g.total_mb };
  }
  page.history.push({ at, cards });
  const cutoff = at - 15 * 60;
  while (page.history.length && page.history[0].at < cutoff) page.history.shift();
}

async function loadHistory() {
  const res = await api("/gpu/history");
  if (!res.ok) return;
  const byTime = new Map();  // the cards' samples of one time are one point
  for (const s of res.body.samples) {
    if (!byTime.has(s.at)) byTime.set(s.at, { at: s.at, cards: {} });
    byTime.get(s.at).cards[s.device] = { used_mb: s.used_mb, foreign_mb: s.foreign_mb,
                                         total_mb: s.total_mb };
  }
  page.history = [...byTime.values()].sort((a, b) => a.at - b.at);
  page.lastSample = page.history.length ? page.history[page.history.length - 1].at : 0;
  drawChart();
}

const CARD_COLOURS = ["#3b82f6", "#10b981", "#a855f7", "#ef4444", "#14b8a6", "#eab308",
                      "#ec4899", "#6366f1"];

function chartSeries(cards) {
  if (cards.length === 1) {
    const c = cards[0];
    return {
      series: [{ label: "used", stroke: "#3b82f6", fill: "rgba(59,130,246,0.15)" },
               { label: "foreign", stroke: "#f59e0b" },
               { label: "total", stroke: "#9ca3af", dash: [4, 4] }],
      values: [s => s.cards[c]?.used_mb ?? null, s => s.cards[c]?.foreign_mb ?? null,
               s => s.cards[c]?.total_mb ?? null],
    };
  }
  return {
    series: [...cards.map((c, i) => ({ label: `GPU ${c} used`,
                                       stroke: CARD_COLOURS[i % CARD_COLOURS.length] })),
             { label: "foreign (all)", stroke: "#f59e0b" },
             { label: "largest card", stroke: "#9ca3af", dash: [4, 4] }],
    values: [...cards.map(c => s => s.cards[c]?.used_mb ?? null),
             s => Object.values(s.cards).reduce((t, x) => t + (x.foreign_mb || 0), 0),
             s => Math.max(0, ...Object.values(s.cards).map(x => x.total_mb || 0))],
  };
}

function drawChart() {
  const box = document.getElementById("chart");
  if (!window.uPlot || !page.history.length) return;
  const h = page.history;
  const cards = [...new Set(h.flatMap(s => Object.keys(s.cards)))].map(Number)
    .sort((a, b) => a - b);
  if (!cards.length) return;
  const { series, values } = chartSeries(cards);
  const data = [h.map(s => s.at), ...values.map(f => h.map(f))];
  const width = Math.max(280, box.clientWidth || 600);
  const key = cards.join(",");
  if (page.chart && (page.chart.width !== width || page.chartKey !== key)) {
    page.chart.destroy(); page.chart = null;
  }
  if (!page.chart) {
    box.replaceChildren();
    page.chartKey = key;
    page.chart = new window.uPlot({
      width, height: 180, legend: { live: false },
      // always the last 15 minutes, so the axis reads in minutes from the first sample on
      scales: { x: { time: true, range: (u, min, max) => [max - 900, max] },
                y: { range: (u, min, max) => [0, Math.max(max, 1)] } },
      axes: [{ stroke: "currentColor" }, { stroke: "currentColor", size: 70,
               values: (u, vals) => vals.map(v => fmtMB(v)) }],
      series: [{}, ...series],
    }, data, box);
  } else {
    page.chart.setData(data);
  }
}

// ---- the token ---------------------------------------------------------------------------

function renderTokenState() {
  const button = document.getElementById("token-button");
  button.hidden = !page.needsToken;
  button.textContent = token() ? "Token set" : "Enter token";
  if (page.status) { renderServices(); renderPhases(); }
}

function setupToken() {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  document.getElementById("token-button").onclick = () => { input.value = ""; dialog.showModal(); };
  document.getElementById("token-cancel").onclick = () => dialog.close();
  document.getElementById("token-clear").onclick = () => {
    sessionStorage.removeItem(TOKEN_KEY); dialog.close(); renderTokenState();
  };
  document.getElementById("token-form").onsubmit = () => {
    if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value);
    renderTokenState();
  };
}

// ---- start ------------------------------------------------------------------------------

function follow() {
  const live = document.getElementById("live");
  const source = new EventSource("/gpu/events");
  source.onopen = () => { live.textContent = "live"; live.className = "pill live"; };
  source.onerror = () => { live.textContent = "reconnecting"; live.className = "pill down"; };
  for (const kind of KINDS) {
    source.addEventListener(kind, msg => {
      let e;
      try { e = JSON.parse(msg.data); } catch { return; }
      page.events.push(e);
      if (page.events.length > MAX_EVENTS) page.events.splice(0, page.events.length - MAX_EVENTS);
      renderEvents();
      scheduleRefresh(kind === "operation" || kind === "step" || kind === "gap");
    });
  }
}

async function main() {
  setupToken();
  document.getElementById("event-filter").onchange = renderEvents;
  const [schema, health] = await Promise.all([api("/openapi.json"), api("/health")]);
  // A daemon with a token declares its security schemes: then actions need it.
  page.needsToken = !!(schema.ok && schema.body.components &&
                       schema.body.components.securitySchemes);
  if (health.ok) document.getElementById("version").textContent = `v${health.body.version}`;
  renderTokenState();
  await refresh();
  await loadHistory();
  follow();
  setInterval(() => { refresh(); }, FALLBACK_MS);
  window.addEventListener("resize", () => drawChart());
  document.body.dataset.ready = "true";
}

main().catch(err => notice("error", "The dashboard failed to start", [String(err)]));
export { STATES };
