// The fleet view: every host of a fleet on Ray (GET /fleet/status), when this daemon is one
// (`fleet:` in its services.yaml). A daemon standing alone answers 404 `fleet_disabled`: the
// section stays hidden and the page asks again only once a minute (a fleet may be configured
// by a reload). While shown, the view refreshes every 2 s.
import { el, fmtMB, hue, fetchJSON } from "/ui/util.js";

const REFRESH_MS = 2000;
const ABSENT_MS = 60000;
const ANSWER_MS = 10000; // a host that does not answer costs the status its peer timeout (5 s)
// what a host runs: its services in any of these states
const SHOWN_STATES = ["ready", "starting", "waking", "unhealthy", "stopping", "sleeping"];

const fleet = { shown: false, seen: new Set(), absentAt: null };

// Every 2 s; a daemon found without a fleet (or not answering before the view was shown) is
// asked again only once ABSENT_MS has passed, and a hidden tab asks nothing.
async function poll() {
  const resting = !fleet.shown && fleet.absentAt != null &&
                  Date.now() - fleet.absentAt < ABSENT_MS;
  if (!document.hidden && !resting) {
    try {
      const res = await fetchJSON("/fleet/status", { signal: AbortSignal.timeout(ANSWER_MS) });
      if (res.ok && res.body && res.body.enabled !== false) {
        render(res.body);
      } else if (res.status === 404 || res.ok || !fleet.shown) {
        hide();
      } else {
        stale(`the fleet's status could not be read (HTTP ${res.status})`);
      }
    } catch (err) {
      if (fleet.shown) stale(`no answer: ${err}`);
      else hide();
    }
  }
  setTimeout(poll, REFRESH_MS);
}

function hide() {
  fleet.absentAt = Date.now();
  fleet.shown = false;
  fleet.seen.clear();
  document.getElementById("fleet").hidden = true;
}

function stale(why) {
  document.getElementById("fleet-note").textContent = `Not refreshed: ${why}.`;
}

function render(st) {
  const section = document.getElementById("fleet");
  const m = st.membership || {};
  const hosts = st.hosts || [];
  const note = [`This daemon is host ${st.host} of the Ray cluster at ${st.address}.`];
  if (m.ok === false) note.push(`Ray's node list could not be read: ${m.error}.`);
  document.getElementById("fleet-note").textContent = note.join(" ");
  const rows = hosts.map(h => hostRow(h, h.host === st.host));
  // a host once listed and now gone from Ray's node list stays, down, until the page reloads
  const listed = new Set(hosts.map(h => h.host));
  for (const name of [...fleet.seen].sort()) {
    if (!listed.has(name) && m.ok !== false) {
      rows.push(hostRow({ host: name, ray_alive: false, reachable: false,
                          error: "no longer in Ray's node list" }, false));
    }
  }
  for (const name of listed) fleet.seen.add(name);
  document.querySelector("#fleet-table tbody").replaceChildren(...rows);
  document.getElementById("fleet-empty").hidden = rows.length > 0;
  fleet.shown = true;
  fleet.absentAt = null;
  section.hidden = false;
}

function hostState(h) {
  if (h.ray_alive === false) return { text: "Ray node dead", cls: "state-failed",
                                      title: h.error || "" };
  if (!h.reachable) return { text: `down: ${h.error || "no answer"}`, cls: "state-unhealthy",
                             title: "" };
  return { text: "up", cls: "state-ready", title: "" };
}

function hostRow(h, self) {
  const s = hostState(h);
  const cell = (label, cls, ...content) => el("td", { class: cls, "data-label": label },
                                              ...content);
  const services = Object.entries(h.services || {})
    .filter(([, x]) => SHOWN_STATES.includes(x.state))
    .map(([name, x]) => {
      const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.background = hue(name);
      return el("li", { "data-service": name,
                        title: `priority ${x.priority} · ${fmtMB(x.vram_mb)}` },
        swatch, name, " ", el("span", { class: `state state-${x.state}` }, x.state));
    });
  return el("tr", { class: "fleet-host", "data-host": h.host,
                    "data-reachable": h.reachable ? "true" : "false" },
    el("th", { scope: "row" }, h.host,
       self ? el("span", { class: "pill" }, "this host") : "",
       h.phase != null ? el("div", { class: "muted small" }, `phase ${h.phase}`) : ""),
    cell("State", "", el("span", { class: `state ${s.cls}`, title: s.title }, s.text)),
    cell("VRAM", "fleet-vram", ...(h.reachable ? bars(h) : ["–"])),
    cell("Services", "", services.length ? el("ul", { class: "fleet-services" }, ...services)
                                         : h.reachable ? el("span", { class: "muted" }, "none")
                                                       : "–"),
    cell("Leases", "num", h.reachable ? String((h.leases || []).length) : "–"));
}

// One bar for the host, or one per card when it has several.
function bars(h) {
  const gpus = h.gpus || [];
  if (gpus.length > 1) {
    return gpus.map(g => bar(`GPU ${g.index}`, g.used_mb, g.total_mb, g.index));
  }
  const v = h.vram || {};
  return [bar("", v.used_mb, v.total_mb, gpus.length ? gpus[0].index : null)];
}

function bar(label, used, total, index) {
  const share = total ? Math.min(100, (100 * (used || 0)) / total) : 0;
  const text = `${fmtMB(used)} of ${fmtMB(total)}`;
  const fill = el("span", { class: "seg used", title: `used: ${fmtMB(used)}` });
  fill.style.width = `${share}%`;
  return el("div", { class: "fleet-card", "data-gpu": index },
    el("div", { class: "bar thin", role: "img",
                "aria-label": `${label ? label + " " : ""}VRAM: ${text} used` }, fill),
    el("span", { class: "muted small" }, `${label ? label + ": " : ""}${text}`));
}

poll();
