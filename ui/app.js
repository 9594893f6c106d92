// lmstack's read-only dashboard. Plain ES module, no build step, nothing loaded from elsewhere.
//
// Nothing is fetched before a login: the token from POST /api/auth/login lives in sessionStorage (this tab
// only) and goes with every request; a 401 drops it and shows the login again. The views poll /api every
// few seconds and keep the last good data on screen while the server cannot be reached.
//
// Every value shown comes from the fleet's repository or its machines: it is only ever set as text
// (textContent), never parsed as markup.

const POLL_MS = 5000;
const TOKEN_KEY = "lmstack.token";
const VIEWS = ["overview", "workers"];

const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(TOKEN_KEY);
let me = null; // {user, role}
let data = null; // the last good snapshot: {sync, workers, deployments, details, at}
let timer = null;
let generation = 0; // bumped at login and logout: answers to an older session's requests are dropped

class Unauthorized extends Error {}

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// -- talking to the API ------------------------------------------------------------------------------------

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch {
    // not the API's error shape (a proxy's page): the status says enough
  }
  return `${response.status} ${response.statusText}`.trim();
}

async function api(path) {
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
    cache: "no-store",
  });
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) throw new HttpError(response.status, await errorMessage(response));
  return response.json();
}

async function snapshot() {
  const [sync, workers, deployments] = await Promise.all([
    api("/api/sync?limit=5"),
    api("/api/workers"),
    api("/api/deployments"),
  ]);
  // The replicas (state, worker, GPUs) are in each deployment's detail; one that was removed meanwhile is
  // simply left out.
  const details = await Promise.all(
    deployments.deployments.map((d) =>
      api(`/api/deployments/${encodeURIComponent(d.name)}`).catch((err) => {
        if (err instanceof HttpError && err.status === 404) return null;
        throw err;
      }),
    ),
  );
  return { sync, workers: workers.workers, deployments: deployments.deployments, details: details.filter(Boolean) };
}

async function poll() {
  const mine = generation;
  timer = null;
  try {
    if (me === null) me = await api("/api/auth/me");
    const fresh = await snapshot();
    if (mine !== generation) return;
    data = { ...fresh, at: new Date() };
    showConnection(null);
    render();
  } catch (err) {
    if (mine !== generation) return;
    if (err instanceof Unauthorized) {
      logOut("Your session has ended: log in again.");
      return;
    }
    const why = err instanceof HttpError ? err.message : "the server cannot be reached";
    showConnection(
      data
        ? `Not updated since ${clock(data.at)}: ${why}. Retrying every ${POLL_MS / 1000} s.`
        : `Cannot load the fleet's state: ${why}. Retrying every ${POLL_MS / 1000} s.`,
    );
    render();
  } finally {
    if (mine === generation && token) timer = setTimeout(poll, POLL_MS);
  }
}

// -- logging in and out -----------------------------------------------------------------------------------

function showLogin(message) {
  $("nav").hidden = true;
  $("session").hidden = true;
  for (const view of VIEWS) $(`view-${view}`).hidden = true;
  $("login").hidden = false;
  $("updated").textContent = "";
  showConnection(null);
  loginError(message || null);
  $("username").focus();
}

function loginError(message) {
  const box = $("login-error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function logIn(event) {
  event.preventDefault();
  const username = $("username").value.trim();
  const password = $("password").value;
  if (!username || !password) {
    loginError("Enter a user name and a password.");
    return;
  }
  const button = $("login-submit");
  button.disabled = true;
  loginError(null);
  try {
    const response = await fetch("/api/auth/login", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ username, password }),
    });
    if (!response.ok) {
      loginError(response.status === 401 ? "Wrong user name or password." : await errorMessage(response));
      $("password").select();
      return;
    }
    const body = await response.json();
    token = body.access_token;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("password").value = "";
    start();
  } catch {
    loginError("The server cannot be reached. Try again in a moment.");
  } finally {
    button.disabled = false;
  }
}

function logOut(message) {
  generation += 1;
  if (timer !== null) clearTimeout(timer);
  timer = null;
  token = null;
  me = null;
  data = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("overview").replaceChildren();
  $("workers").replaceChildren();
  showLogin(message);
}

function start() {
  generation += 1;
  $("login").hidden = true;
  $("nav").hidden = false;
  $("session").hidden = false;
  $("who").textContent = "";
  render();
  focusView();
  poll();
}

// -- views -------------------------------------------------------------------------------------------------

function currentView() {
  const name = location.hash.replace(/^#\/?/, "");
  return VIEWS.includes(name) ? name : "overview";
}

function focusView() {
  if (!token) return;
  const heading = $(`${currentView()}-title`);
  heading.tabIndex = -1;
  heading.focus({ preventScroll: true });
}

function render() {
  if (!token) return;
  const view = currentView();
  for (const name of VIEWS) $(`view-${name}`).hidden = name !== view;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${view === "overview" ? "Overview" : "Workers"} · lmstack`;
  if (me) $("who").textContent = `${me.user} (${me.role})`;
  $("updated").textContent = data ? `Updated ${clock(data.at)} · every ${POLL_MS / 1000} s` : "Loading…";
  if (!data) return;
  if (view === "overview") $("overview").replaceChildren(...overview(data));
  else $("workers").replaceChildren(workers(data));
}

function showConnection(message) {
  const banner = $("connection");
  banner.textContent = message || "";
  banner.hidden = !message;
}

// -- overview ---------------------------------------------------------------------------------------------

// The API's state is Synced / OutOfSync / Unknown; the latest run says whether a sync is under way
// (Progressing) or failed (Degraded).
function syncState(sync) {
  const last = sync.runs[0];
  if (last && last.status === "running") {
    return ["Progressing", `Applying ${short(last.revision)} (${last.trigger}), started ${ago(last.startedAt)}.`];
  }
  if (last && last.status === "failed") return ["Degraded", `The last sync failed: ${last.error || "no reason given"}`];
  return [sync.state, sync.message];
}

function overview(d) {
  const [state, message] = syncState(d.sync);
  const head = d.sync.head;
  const last = d.sync.runs[0];

  const sync = h("section", { class: "panel sync", "aria-labelledby": "sync-title" },
    h("div", { class: "panel-head" },
      h("h2", { id: "sync-title", text: "Sync" }),
      badge(state, { Synced: "ok", OutOfSync: "warn", Progressing: "busy", Degraded: "bad" }[state] || "none")),
    h("p", { class: "message", text: message }),
    h("dl", { class: "facts" },
      item("Branch", head ? head.ref : "—", head ? head.origin : null),
      item("Commit", head ? sha(head.revision) : "—"),
      item("Subject", head ? head.subject : "—"),
      item("Applied", d.sync.revision ? sha(d.sync.revision) : "nothing yet"),
      item("Last sync", last ? runSummary(last) : "none yet", null, "wide")));

  const ready = d.workers.filter((w) => w.status === "Ready").length;
  const notReady = d.workers.filter((w) => w.status !== "Ready");
  const fleet = h("section", { class: "panel", "aria-labelledby": "fleet-workers" },
    h("div", { class: "panel-head" },
      h("h2", { id: "fleet-workers", text: "Workers" }),
      h("a", { href: "#/workers", text: "All workers" })),
    counts([["Ready", ready, "ok"], ["NotReady", notReady.length, notReady.length ? "bad" : "none"]]),
    notReady.length
      ? h("ul", { class: "reasons" }, notReady.map((w) => h("li", {}, h("strong", { text: w.name }), `: ${w.reason || "no reason given"}`)))
      : null);

  const byState = {};
  for (const detail of d.details) for (const r of detail.replicas) byState[r.status] = (byState[r.status] || 0) + 1;
  const order = ["ready", "starting", "pending", "deleting", "failed", "missing"];
  const states = Object.keys(byState).sort((a, b) => order.indexOf(a) - order.indexOf(b));
  const replicas = h("section", { class: "panel", "aria-labelledby": "fleet-replicas" },
    h("div", { class: "panel-head" }, h("h2", { id: "fleet-replicas", text: "Replicas" })),
    states.length
      ? counts(states.map((s) => [s, byState[s], TONE[s] || "none"]))
      : h("p", { class: "muted", text: "No replicas." }),
    d.deployments.length ? deploymentTable(d.deployments) : h("p", { class: "muted", text: "No deployments." }));

  return [sync, h("div", { class: "columns" }, fleet, replicas)];
}

function runSummary(run) {
  const when = run.finishedAt || run.startedAt;
  const actions = Object.entries(run.summary || {}).filter(([, n]) => n > 0).map(([k, n]) => `${n} ${k}`);
  return h("span", {},
    badge(run.status, { succeeded: "ok", running: "busy", failed: "bad" }[run.status] || "none"),
    ` ${ago(when)}`, h("span", { class: "muted", text: ` · ${run.trigger}` }),
    run.revision ? [" · ", sha(run.revision)] : null,
    actions.length ? h("span", { class: "muted", text: ` · ${actions.join(", ")}` }) : null,
    run.error ? h("span", { class: "error-text", text: ` · ${run.error}` }) : null);
}

function deploymentTable(deployments) {
  return h("div", { class: "table-wrap" },
    h("table", {},
      h("caption", { class: "visually-hidden", text: "Deployments" }),
      h("thead", {}, h("tr", {}, ["Deployment", "Backend", "Ready", "Condition"].map((c) => h("th", { scope: "col", class: c === "Backend" ? "wide-only" : null, text: c })))),
      h("tbody", {}, deployments.map((dep) => {
        const degraded = dep.conditions.find((c) => c.type === "Degraded" && c.status === "True");
        const readyCondition = dep.conditions.find((c) => c.type === "Ready");
        const shown = degraded || readyCondition;
        const tone = degraded ? "bad" : dep.replicasReady >= dep.replicasWanted ? "ok" : "warn";
        return h("tr", {},
          h("th", { scope: "row" }, dep.name, h("div", { class: "muted small", text: dep.model })),
          h("td", { class: "wide-only", text: dep.backend }),
          h("td", {}, badge(`${dep.replicasReady}/${dep.replicasWanted}`, tone)),
          h("td", {}, shown ? [shown.reason || shown.type, shown.message ? h("div", { class: "muted small", text: shown.message }) : null] : "—"));
      }))));
}

// -- workers ----------------------------------------------------------------------------------------------

function workers(d) {
  if (!d.workers.length) return h("p", { class: "muted", text: "No workers: add Worker manifests to the repository." });
  const replicas = new Map(); // "deployment/ordinal" -> replica
  for (const detail of d.details) for (const r of detail.replicas) replicas.set(r.name, r);
  return h("ul", { class: "cards" }, d.workers.map((w) => h("li", {}, workerCard(w, replicas))));
}

function workerCard(w, replicas) {
  const facts = w.facts;
  const gpus = facts ? facts.gpus : [];
  const mine = w.replicas.map((name) => replicas.get(name) || { name, status: "unknown", gpus: [] });
  const id = `worker-${w.name}`;
  return h("article", { class: "card worker", "aria-labelledby": id, "data-worker": w.name },
    h("div", { class: "panel-head" },
      h("h2", { id, text: w.name }),
      badge(w.status, w.status === "Ready" ? "ok" : "bad")),
    h("p", { class: "muted small" },
      `host ${w.host}`,
      Object.entries(w.labels).map(([k, v]) => [" ", h("span", { class: "label", text: `${k}=${v}` })])),
    w.reason ? h("p", { class: "reason", text: w.reason }) : null,
    h("p", { class: "small" }, w.factsAt ? ["Facts ", timeAgo(w.factsAt)] : "No facts gathered yet."),
    gpus.length
      ? h("ul", { class: "gpus", "aria-label": `GPUs of ${w.name}` }, gpus.map((g) => h("li", {}, gpu(g, mine))))
      : h("p", { class: "muted small", text: facts && facts.gpuError ? `No GPUs: ${facts.gpuError}` : "No GPUs." }),
    h("h3", { text: "Replicas" }),
    mine.length
      ? h("ul", { class: "replicas" }, mine.map((r) => h("li", {},
          badge(r.status, TONE[r.status] || "none"), " ", h("span", { text: r.name }),
          r.gpus.length ? h("span", { class: "muted", text: ` · GPU ${r.gpus.join(", ")}` }) : null,
          r.message ? h("div", { class: "muted small", text: r.message }) : null)))
      : h("p", { class: "muted small", text: "None." }),
    facts ? h("p", { class: "muted small", text: machine(facts) }) : null);
}

function gpu(g, replicas) {
  const total = g.memoryTotal || 0;
  const known = total > 0 && g.memoryUsed !== null && g.memoryUsed !== undefined;
  const other = Math.min(g.memoryUnmanaged || 0, total);
  const used = known ? Math.min(g.memoryUsed, total) : other;
  const ours = Math.max(0, used - other);
  const free = Math.max(0, total - used);
  const on = replicas.filter((r) => r.gpus.includes(g.index)).map((r) => r.name);
  const memoryText = total
    ? `lmstack ${bytes(ours)} · other ${bytes(other)} · free ${known ? bytes(free) : "unknown"} of ${bytes(total)}`
    : "memory unknown";
  const bar = h("div", { class: "bar memory", role: "img", "aria-label": `Memory: ${memoryText}` },
    segment("ours", ours, total), segment("other", other, total), segment("free", known ? free : 0, total));
  const util = g.utilization;
  const utilBar = h("div", { class: "bar util", role: "img", "aria-label": `Utilisation ${util === null || util === undefined ? "unknown" : `${util} %`}` },
    segment("busy", util || 0, 100));
  return h("div", { class: "gpu", "data-gpu": g.index },
    h("div", { class: "gpu-title" },
      h("strong", { text: `GPU ${g.index}` }), " ", h("span", { text: g.name || "unknown model" })),
    h("div", { class: "gauge" }, h("span", { class: "gauge-label", text: "Memory" }), bar,
      h("span", { class: "gauge-value", text: known ? `${Math.round((100 * used) / total)} %` : "—" })),
    h("p", { class: "legend small" },
      h("span", { class: "legend-item" }, h("span", { class: "key ours" }), `lmstack ${bytes(ours)}`),
      h("span", { class: "legend-item" }, h("span", { class: "key other" }), `other ${bytes(other)}`),
      h("span", { class: "legend-item" }, h("span", { class: "key free" }), `free ${known ? bytes(free) : "unknown"}`),
      h("span", { class: "legend-item muted", text: `of ${total ? bytes(total) : "unknown"}` })),
    h("div", { class: "gauge" }, h("span", { class: "gauge-label", text: "Utilisation" }), utilBar,
      h("span", { class: "gauge-value", text: util === null || util === undefined ? "—" : `${util} %` })),
    on.length ? h("p", { class: "small", text: `Runs ${on.join(", ")}` }) : null);
}

function segment(kind, value, total) {
  const el = h("span", { class: `seg ${kind}` });
  el.style.width = `${total > 0 ? Math.max(0, Math.min(100, (100 * value) / total)) : 0}%`; // CSSOM: allowed by the CSP
  return el;
}

function machine(f) {
  const parts = [];
  if (f.cpus) parts.push(`${f.cpus} CPUs`);
  if (f.memoryTotal) parts.push(`${bytes(f.memoryTotal)} RAM`);
  if (f.diskFree !== null && f.diskFree !== undefined) parts.push(`${bytes(f.diskFree)} disk free`);
  parts.push(f.dockerVersion ? `Docker ${f.dockerVersion}` : `Docker: ${f.dockerError || "unknown"}`);
  return parts.join(" · ");
}

// -- small pieces -----------------------------------------------------------------------------------------

const TONE = { ready: "ok", starting: "busy", pending: "busy", deleting: "none", failed: "bad", missing: "bad" };

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") el.textContent = value;
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function badge(text, tone) {
  return h("span", { class: `badge ${tone}`, text });
}

function item(term, value, note, wide) {
  return h("div", { class: wide || null }, h("dt", { text: term }), h("dd", {}, value, note ? h("span", { class: "muted small", text: ` ${note}` }) : null));
}

function counts(rows) {
  return h("ul", { class: "counts" }, rows.map(([label, n, tone]) =>
    h("li", { class: tone }, h("span", { class: "count", text: String(n) }), h("span", { text: label }))));
}

function short(revision) {
  return revision ? revision.slice(0, 12) : "—";
}

function sha(revision) {
  return h("code", { class: "sha", title: revision, "data-sha": revision, text: short(revision) });
}

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value >= 100 || unit === 0 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
}

function ago(iso) {
  if (!iso) return "—";
  const s = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function timeAgo(iso) {
  return h("time", { datetime: iso, title: new Date(iso).toLocaleString(), text: ago(iso) });
}

function clock(date) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

// -- start ------------------------------------------------------------------------------------------------

$("login-form").addEventListener("submit", logIn);
$("logout").addEventListener("click", () => logOut(null));
window.addEventListener("hashchange", () => {
  render();
  focusView();
});

if (token) start();
else showLogin(null);
