// Small DOM and formatting helpers for the dashboard (no framework).

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === false || value == null) continue;
    if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else if (value === true) {
      node.setAttribute(key, "");
    } else {
      node.setAttribute(key, String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === "" || child == null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function fmtMB(mb) {
  if (mb == null) return "–";
  if (Math.abs(mb) >= 1024) return `${(mb / 1024).toFixed(1)} GB`;
  return `${Math.round(mb)} MB`;
}

// How long ago (or for how long since) an epoch time in seconds.
export function ago(ts) {
  if (ts == null) return "";
  let s = Math.max(0, Math.round(Date.now() / 1000 - ts));
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

// A stable colour per service name, so a service keeps its colour in the bar.
export function hue(name) {
  let h = 0;
  for (const c of name) h = (h * 31 + c.charCodeAt(0)) % 360;
  return `hsl(${h} 60% 50%)`;
}

// The API from this page's origin, with the token this tab was given (if any): the answer's
// status and JSON body (null when it has none). The page's modules share it.
export const TOKEN_KEY = "gpu-manager-token";

export function token() { return sessionStorage.getItem(TOKEN_KEY); }

export async function fetchJSON(path, options = {}) {
  const headers = { Accept: "application/json" };
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  const res = await fetch(path, { ...options, headers, cache: "no-store" });
  let body = null;
  try { body = await res.json(); } catch { body = null; }
  return { ok: res.ok, status: res.status, body };
}
