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
const VIEWS = ["overview", "workers", "deployments", "sync", "events", "usage"];
const TITLES = { overview: "Overview", workers: "Workers", deployments: "Deployments", sync: "Sync history",
  events: "Events", usage: "Usage" };
const LOG_LINES = 1000; // kept in the live-logs panel; older lines are dropped
const USAGE_WINDOWS = { "1h": 1, "24h": 24, "7d": 24 * 7 }; // hours

const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(TOKEN_KEY);
let me = null; // {user, role}
let data = null; // the last good snapshot: {sync, workers, deployments, details, at}
let timer = null;
let generation = 0; // bumped at login and logout: answers to an older session's requests are dropped
let polling = false; // a poll is in flight
let again = false; // poll again as soon as the one in flight ends (the view changed meanwhile)
const openRuns = new Set(); // sync runs whose plan the user opened: kept open across updates
let logs = null; // the live-logs panel of the deployment shown: {deployment, panel, select, button, output, note, ws}

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

// What every view needs (the overview's and the workers' data), and what the current view adds.
async function snapshot(route) {
  const syncPath = route.view === "sync" ? "/api/sync?limit=25&plans=true" : "/api/sync?limit=5";
  const [sync, workers, deployments, extra] = await Promise.all([
    api(syncPath),
    api("/api/workers"),
    api("/api/deployments"),
    extras(route),
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
  return { sync, workers: workers.workers, deployments: deployments.deployments, details: details.filter(Boolean),
    extra: { key: extrasKey(route), ...extra } };
}

// The current view's own data: which requests, and a key that says whether `data` holds them already.
function extrasKey(route) {
  if (route.view === "deployments" && route.name) return `deployment:${route.name}`;
  if (route.view === "usage") return `usage:${usageWindow()}`;
  return route.view;
}

async function extras(route) {
  if (route.view === "deployments" && route.name) {
    const object = encodeURIComponent(`Deployment/${route.name}`);
    return { events: (await api(`/api/events?object=${object}&limit=25`)).events };
  }
  if (route.view === "events") return { events: (await api("/api/events?limit=200")).events };
  if (route.view === "overview") return { traffic: await api("/api/traffic") };
  if (route.view === "usage") {
    const since = new Date(Date.now() - USAGE_WINDOWS[usageWindow()] * 3600 * 1000);
    since.setUTCMinutes(0, 0, 0); // rows cover whole hours
    return { usage: (await api(`/api/usage?from=${encodeURIComponent(since.toISOString())}&limit=10000`)).data };
  }
  return {};
}

async function poll() {
  const mine = generation;
  timer = null;
  polling = true;
  again = false;
  try {
    if (me === null) me = await api("/api/auth/me");
    const fresh = await snapshot(currentRoute());
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
    if (mine === generation) polling = false;
    if (mine === generation && token) timer = setTimeout(poll, again ? 0 : POLL_MS);
  }
}

// Fetch now (the view changed and needs data the last snapshot does not hold).
function refreshSoon() {
  if (!token) return;
  if (polling) {
    again = true;
    return;
  }
  if (timer !== null) clearTimeout(timer);
  poll();
}

// -- logging in and out -----------------------------------------------------------------------------------

function showLogin(message) {
  $("nav").hidden = true;
  $("session").hidden = true;
  for (const view of VIEWS) $(`view-${view}`).hidden = true;
  $("deployment").hidden = true;
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
  polling = false;
  token = null;
  me = null;
  data = null;
  sessionStorage.removeItem(TOKEN_KEY);
  closeLogs();
  closeTraffic();
  openRuns.clear();
  for (const id of ["overview", "workers", "deployments", "deployment-body", "sync", "events", "usage"]) {
    $(id).replaceChildren();
  }
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

// "#/deployments/chat" is the view "deployments" with the detail of "chat".
function currentRoute() {
  const [name, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  if (!VIEWS.includes(name)) return { view: "overview", name: null };
  const detail = name === "deployments" && rest.length ? decodeURIComponent(rest.join("/")) : null;
  return { view: name, name: detail };
}

function currentView() {
  return currentRoute().view;
}

function focusView() {
  if (!token) return;
  const route = currentRoute();
  // (The overview's Sync panel has "sync-title".)
  const heading = $(route.name ? "deployment-title" : route.view === "sync" ? "sync-history-title" : `${route.view}-title`);
  heading.tabIndex = -1;
  heading.focus({ preventScroll: true });
}

function render() {
  if (!token) return;
  const route = currentRoute();
  const view = route.view;
  for (const name of VIEWS) $(`view-${name}`).hidden = name !== view || Boolean(route.name);
  $("deployment").hidden = !route.name;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${route.name || TITLES[view]} · lmstack`;
  if (me) $("who").textContent = `${me.user} (${me.role})`;
  $("updated").textContent = data ? `Updated ${clock(data.at)} · every ${POLL_MS / 1000} s` : "Loading…";
  if (!route.name || (logs && logs.deployment !== route.name)) closeLogs();
  if (route.name) $("deployment-title").textContent = route.name;
  if (!data) return;
  const ready = data.extra.key === extrasKey(route); // else: fetched for another view; the next poll brings it
  if (view === "overview") {
    $("overview").replaceChildren(...overview(data));
    traffic(data, ready);
  }
  else if (view === "workers") $("workers").replaceChildren(workers(data));
  else if (view === "deployments" && route.name) deploymentView(data, route.name, ready);
  else if (view === "deployments") $("deployments").replaceChildren(deploymentList(data));
  else if (view === "sync") $("sync").replaceChildren(ready ? syncHistory(data) : loading());
  else if (view === "events") $("events").replaceChildren(ready ? eventList(data.extra.events) : loading());
  else if (view === "usage") $("usage").replaceChildren(...(ready ? usage(data.extra.usage) : [loading()]));
}

function loading() {
  return h("p", { class: "muted", text: "Loading…" });
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
  const order = ["ready", "starting", "pending", "draining", "deleting", "failed", "missing"];
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
          h("th", { scope: "row" }, deploymentLink(dep.name), h("div", { class: "muted small", text: dep.model })),
          h("td", { class: "wide-only", text: dep.backend }),
          h("td", {}, badge(`${dep.replicasReady}/${dep.replicasWanted}`, tone)),
          h("td", {}, shown ? [shown.reason || shown.type, shown.message ? h("div", { class: "muted small", text: shown.message }) : null] : "—"));
      }))));
}

// -- traffic: the gateway's last 15 minutes per model (GET /api/traffic), drawn with uPlot (ui/vendor) -------
//
// The series lives in the server's memory (all its processes count into one; it starts empty at a restart). The
// charts are made once and get new data at each update; they are made again only when the models or the
// colour scheme change. The bucket still filling is left out of the charts (it would read as a dip) and
// counted in the totals.

const CHARTS = [
  { key: "requests", title: "Requests/s", unit: "/s", rate: true, pick: (s, i) => s.requests[i] },
  { key: "tokens", title: "Tokens/s", note: "prompt + completion", unit: "/s", rate: true,
    pick: (s, i) => s.promptTokens[i] + s.completionTokens[i] },
  { key: "errors", title: "Errors/s", note: "status 400 or more", unit: "/s", rate: true, pick: (s, i) => s.errors[i] },
  { key: "ttft", title: "Time to first token", note: "mean", unit: " ms", rate: false, pick: (s, i) => s.ttftMs[i] },
];
const SERIES_COLORS = 8; // --series-0 … --series-7 in app.css, one set for light and one for dark
const DARK = window.matchMedia("(prefers-color-scheme: dark)");
let charts = null; // {panel, plots: Map(key -> {chart, host, plot}), table, note, shape, observer}

function traffic(d, ready) {
  if (!charts) {
    charts = makeTrafficPanel();
    $("overview-traffic").replaceChildren(charts.panel);
  }
  if (!ready || !d.extra.traffic) return; // fetched for another view: the next poll brings it
  const t = d.extra.traffic;
  const byName = new Map(t.models.map((s) => [s.model, s]));
  // Every deployment's model, with traffic or not, and any other model that had some (one since removed).
  const names = [...new Set([...d.deployments.map((dep) => dep.servedName), ...byName.keys()])].sort();
  charts.note.textContent = `Last ${Math.round(t.windowSeconds / 60)} minutes in ${t.bucketSeconds}-second steps, ` +
    "as this server counted them (it starts again from zero when the server restarts).";
  if (!names.length) {
    dropPlots();
    charts.grid.replaceChildren(h("p", { class: "muted", text: "No models deployed, and no requests." }));
    charts.table.replaceChildren();
    return;
  }
  const done = t.times.length - 1; // the last bucket is still filling
  const xs = t.times.slice(0, done);
  const shape = `${DARK.matches ? "dark" : "light"}\u0000${names.join("\u0000")}`;
  if (shape !== charts.shape) {
    dropPlots();
    const figures = CHARTS.map((c) => chartFigure(c));
    charts.grid.replaceChildren(...figures.map((f) => f.figure)); // in the page first: the plots take its width
    for (const f of figures) makePlot(f, names);
    charts.shape = shape;
  }
  for (const c of CHARTS) {
    const ys = names.map((name) => {
      const s = byName.get(name);
      return xs.map((_, i) => {
        if (!s) return c.rate ? 0 : null;
        const v = c.pick(s, i);
        return v === null || v === undefined ? null : c.rate ? v / t.bucketSeconds : v;
      });
    });
    const entry = charts.plots.get(c.key);
    entry.plot.setData([xs, ...ys]);
    entry.plot.setLegend(); // the legend's values again (the latest, unless the pointer is over the plot)
    entry.host.setAttribute("aria-label", `${c.title} over the last ${Math.round(t.windowSeconds / 60)} minutes: ` +
      names.map((name, i) => `${name} up to ${fmt(Math.max(0, ...ys[i].filter((v) => v !== null)))}${c.unit}`).join(", "));
  }
  charts.table.replaceChildren(trafficTotals(names, byName));
}

function makeTrafficPanel() {
  const grid = h("div", { class: "charts" });
  const note = h("p", { class: "muted small" });
  const table = h("div", {});
  const panel = h("section", { class: "panel traffic", "aria-labelledby": "traffic-title" },
    h("div", { class: "panel-head" }, h("h2", { id: "traffic-title", text: "Traffic" }),
      h("a", { href: "#/usage", text: "Usage by key" })),
    note, grid, table);
  // Each plot follows its box's width (the page's layout decides it; uPlot draws at a fixed size).
  const observer = new ResizeObserver((entries) => {
    for (const e of entries) {
      const found = [...charts.plots.values()].find((p) => p.host === e.target);
      const width = Math.floor(e.contentRect.width);
      if (found && width > 0 && width !== found.plot.width) found.plot.setSize({ width, height: chartHeight() });
    }
  });
  return { panel, grid, note, table, plots: new Map(), shape: null, observer };
}

function chartHeight() {
  return window.matchMedia("(max-width: 720px)").matches ? 150 : 180;
}

function chartFigure(c) {
  const id = `chart-${c.key}`;
  const host = h("div", { class: "chart-plot", role: "img", "aria-label": c.title });
  const figure = h("figure", { class: "chart", "data-chart": c.key, "aria-labelledby": id },
    h("figcaption", { id }, h("strong", { text: c.title }), c.note ? h("span", { class: "muted small", text: ` ${c.note}` }) : null),
    host);
  return { chart: c, figure, host };
}

function makePlot({ chart: c, host }, names) {
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const axis = {
    stroke: color("--muted"),
    font: "12px system-ui, sans-serif",
    grid: { stroke: color("--line"), width: 1 },
    ticks: { stroke: color("--line"), width: 1, size: 4 },
  };
  const colors = [null, ...names.map((_, i) => color(`--series-${i % SERIES_COLORS}`))];
  // The legend shows the values under the pointer, and the latest bucket's while the pointer is elsewhere.
  const shown = (u, v, si, idx) => (idx === null || idx === undefined ? u.data[si][u.data[si].length - 1] : v);
  const plot = new uPlot({
    width: Math.max(200, host.clientWidth || 300),
    height: chartHeight(),
    legend: { show: true, live: true, markers: { width: 0, fill: (u, si) => colors[si] } },
    cursor: { y: false, points: { size: 6 } },
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, niceCeil(max)] } },
    axes: [
      { ...axis, space: 60, size: 30, values: (u, values) => values.map((v) => hhmm(v)) },
      { ...axis, size: 44, values: (u, values) => values.map((v) => fmt(v)) },
    ],
    series: [
      { label: "At", value: (u, v, si, idx) => { const t = shown(u, v, si, idx); return t ? hhmm(t, true) : "—"; } },
      ...names.map((name, i) => ({
        label: name,
        stroke: colors[i + 1],
        width: 2,
        // Time to first token has gaps (buckets without a generation): dots, so a lone bucket still shows.
        points: c.rate ? { show: false } : { show: true, size: 5, fill: colors[i + 1] },
        spanGaps: false,
        value: (u, v, si, idx) => {
          const value = shown(u, v, si, idx);
          return value === null || value === undefined ? "—" : `${fmt(value)}${c.unit}`;
        },
      })),
    ],
  }, [[], ...names.map(() => [])], host);
  charts.plots.set(c.key, { chart: c, host, plot });
  charts.observer.observe(host);
}

function trafficTotals(names, byName) {
  const sum = (list) => list.reduce((a, b) => a + b, 0);
  return h("div", { class: "table-wrap" }, h("table", { class: "traffic-totals" },
    h("caption", { class: "small muted", text: "Totals over the window" }),
    h("thead", {}, h("tr", {},
      h("th", { scope: "col", text: "Model" }),
      h("th", { scope: "col", class: "num", text: "Requests" }),
      h("th", { scope: "col", class: "num", text: "Errors" }),
      h("th", { scope: "col", class: "num", text: "Tokens in / out" }))),
    h("tbody", {}, names.map((name, i) => {
      const s = byName.get(name);
      const errors = s ? sum(s.errors) : 0;
      return h("tr", { "data-model": name },
        h("th", { scope: "row" }, h("span", { class: `key series-${i % SERIES_COLORS}` }), name),
        h("td", { class: "num", text: count(s ? sum(s.requests) : 0) }),
        h("td", { class: `num${errors ? " error-text" : ""}`, text: count(errors) }),
        h("td", { class: "num", text: s ? `${count(sum(s.promptTokens))} / ${count(sum(s.completionTokens))}` : "0 / 0" }));
    }))));
}

function dropPlots() {
  if (!charts) return;
  for (const { host, plot } of charts.plots.values()) {
    charts.observer.unobserve(host);
    plot.destroy();
  }
  charts.plots.clear();
  charts.shape = null;
}

function closeTraffic() {
  if (!charts) return;
  dropPlots();
  charts.observer.disconnect();
  charts = null;
  $("overview-traffic").replaceChildren();
}

// The axis's top: 1, 2 or 5 times a power of ten, at or above `max` (1 when there is nothing).
function niceCeil(max) {
  if (!(max > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(max));
  for (const step of [1, 2, 5, 10]) if (step * power >= max) return step * power;
  return 10 * power;
}

// Unix seconds as the local time of day, "14:05" (or "14:05:30").
function hhmm(seconds, withSeconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23",
    second: withSeconds ? "2-digit" : undefined });
}

function fmt(v) {
  if (v >= 10000) return `${Math.round(v / 1000)}k`;
  if (v >= 1000) return `${(v / 1000).toFixed(1).replace(/\.0$/, "")}k`;
  if (v >= 10 || Number.isInteger(v)) return String(Math.round(v));
  return String(Number(v.toPrecision(v >= 1 ? 3 : 2))); // 2.5, 1.25, 0.075, 0.33
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

// -- deployments ------------------------------------------------------------------------------------------

// A condition's tone: Ready True is good, Degraded True is bad, Progressing True is under way.
function conditionTone(c) {
  if (c.type === "Ready") return c.status === "True" ? "ok" : "warn";
  if (c.type === "Degraded" || c.type === "Stalled") return c.status === "True" ? "bad" : "none";
  if (c.type === "Progressing") return c.status === "True" ? "busy" : "none";
  return "none";
}

function deploymentTone(dep) {
  if (dep.conditions.some((c) => c.type === "Degraded" && c.status === "True")) return "bad";
  return dep.replicasReady >= dep.replicasWanted ? "ok" : "warn";
}

function deploymentLink(name) {
  return h("a", { href: `#/deployments/${encodeURIComponent(name)}`, text: name });
}

function placementText(spec) {
  const p = spec && spec.placement;
  if (!p) return "—";
  const parts = [p.strategy];
  if (p.workers && p.workers.length) parts.push(`on ${p.workers.join(", ")}`);
  const selector = Object.entries(p.selector || {}).map(([k, v]) => `${k}=${v}`);
  if (selector.length) parts.push(`where ${selector.join(", ")}`);
  const gpus = spec.resources ? spec.resources.gpus : 0;
  parts.push(gpus ? `${gpus} GPU${gpus === 1 ? "" : "s"} each` : "no GPU");
  return parts.join(" · ");
}

// The revisions the replicas run, with how many run each ("abc123 ×2").
function revisions(replicas) {
  const counts = new Map();
  for (const r of replicas) counts.set(r.revision || "", (counts.get(r.revision || "") || 0) + 1);
  if (!counts.size) return "—";
  return [...counts].map(([rev, n], i) => [i ? ", " : null, rev ? sha(rev) : "unknown",
    counts.size > 1 || n > 1 ? h("span", { class: "muted", text: ` ×${n}` }) : null]);
}

function conditionList(conditions) {
  if (!conditions.length) return h("p", { class: "muted small", text: "No conditions recorded yet." });
  return h("ul", { class: "conditions" }, conditions.map((c) => h("li", { "data-condition": c.type },
    badge(`${c.type} ${c.status === "True" ? "✓" : "✗"}`, conditionTone(c)),
    h("span", { class: "visually-hidden", text: ` (${c.status})` }),
    c.reason ? [" ", h("strong", { text: c.reason })] : null,
    c.message ? h("div", { class: "condition-message small", text: c.message }) : null,
    c.lastTransitionTime ? h("div", { class: "muted small" }, "since ", timeAgo(c.lastTransitionTime)) : null)));
}

function deploymentList(d) {
  if (!d.deployments.length) return h("p", { class: "muted", text: "No deployments: add Deployment manifests to the repository." });
  const details = new Map(d.details.map((x) => [x.name, x]));
  return h("div", { class: "table-wrap" },
    h("table", { class: "deployments" },
      h("caption", { class: "visually-hidden", text: "Deployments" }),
      h("thead", {}, h("tr", {},
        h("th", { scope: "col", text: "Deployment" }),
        h("th", { scope: "col", class: "wide-only", text: "Backend" }),
        h("th", { scope: "col", text: "Ready" }),
        h("th", { scope: "col", class: "wide-only", text: "Placement" }),
        h("th", { scope: "col", text: "Conditions" }),
        h("th", { scope: "col", class: "wide-only", text: "Replicas run" }))),
      h("tbody", {}, d.deployments.map((dep) => {
        const detail = details.get(dep.name);
        // What is wrong first: Degraded (bad) before not Ready (warn).
        const problems = dep.conditions.filter((c) => conditionTone(c) === "bad" || conditionTone(c) === "warn")
          .sort((a, b) => (conditionTone(a) === "bad" ? 0 : 1) - (conditionTone(b) === "bad" ? 0 : 1));
        return h("tr", { "data-deployment": dep.name },
          h("th", { scope: "row" }, deploymentLink(dep.name),
            h("div", { class: "muted small" }, `${dep.model}`, dep.servedName !== dep.model ? ` · served as ${dep.servedName}` : null)),
          h("td", { class: "wide-only", text: dep.backend }),
          h("td", {}, badge(`${dep.replicasReady}/${dep.replicasWanted}`, deploymentTone(dep))),
          h("td", { class: "wide-only small", text: detail ? placementText(detail.spec) : "—" }),
          h("td", {}, problems.length ? conditionList(problems)
            : badge(dep.conditions.length ? "Ready" : "no conditions", dep.conditions.length ? "ok" : "none")),
          h("td", { class: "wide-only" }, detail ? revisions(detail.replicas) : "—"));
      }))));
}

function deploymentView(d, name, ready) {
  const detail = d.details.find((x) => x.name === name);
  const body = $("deployment-body");
  if (!detail) {
    body.replaceChildren(h("p", { class: "muted" }, `No deployment ${name} (removed from the repository, or not applied yet). `,
      h("a", { href: "#/deployments", text: "All deployments" })));
    $("deployment-logs").replaceChildren();
    return;
  }
  const admin = me && me.role === "admin";
  const head = h("section", { class: "panel", "aria-labelledby": "deployment-summary" },
    h("div", { class: "panel-head" },
      h("h2", { id: "deployment-summary", text: "Summary" }),
      badge(`${detail.replicasReady}/${detail.replicasWanted} ready`, deploymentTone(detail))),
    h("dl", { class: "facts" },
      item("Model", detail.model),
      item("Served name", detail.servedName),
      item("Backend", detail.backend),
      item("Image", detail.image ? h("code", { text: detail.image }) : "—"),
      item("Placement", placementText(detail.spec)),
      item("Applied revision", detail.revision ? sha(detail.revision) : "none yet"),
      detail.lastAttemptedRevision && detail.lastAttemptedRevision !== detail.revision
        ? item("Last attempted", sha(detail.lastAttemptedRevision), "(not applied without failure)") : null),
    h("h3", { text: "Conditions" }),
    staleConditions(detail),
    conditionList(detail.conditions));

  const replicas = h("section", { class: "panel", "aria-labelledby": "deployment-replicas" },
    h("div", { class: "panel-head" }, h("h2", { id: "deployment-replicas", text: "Replicas" })),
    detail.replicas.length ? h("div", { class: "table-wrap" }, h("table", { class: "replica-table" },
      h("caption", { class: "visually-hidden", text: `Replicas of ${name}` }),
      h("thead", {}, h("tr", {},
        h("th", { scope: "col", text: "Replica" }),
        h("th", { scope: "col", class: "wide-only", text: "Worker" }),
        h("th", { scope: "col", text: "Status" }),
        h("th", { scope: "col", class: "wide-only", text: "Revision" }),
        h("th", { scope: "col", class: "wide-only", text: "Updated" }),
        admin ? h("th", { scope: "col", class: "wide-only", text: "Endpoint" }) : null)),
      h("tbody", {}, detail.replicas.map((r) => replicaRow(detail, r, admin))))) : h("p", { class: "muted", text: "No replicas recorded." }));

  const events = h("section", { class: "panel", "aria-labelledby": "deployment-events" },
    h("div", { class: "panel-head" }, h("h2", { id: "deployment-events", text: "Recent events" }),
      h("a", { href: "#/events", text: "All events" })),
    ready ? eventTable(d.extra.events, false) : loading());

  const spec = h("section", { class: "panel", "aria-labelledby": "deployment-spec" },
    h("div", { class: "panel-head" }, h("h2", { id: "deployment-spec", text: "Spec as applied" }),
      h("span", { class: "muted small" }, "hash ", h("code", { text: detail.specHash.slice(0, 12) }))),
    Object.keys(detail.spec || {}).length
      ? h("pre", { class: "spec", tabindex: "0", "aria-label": "The spec as applied, as JSON", text: JSON.stringify(detail.spec, null, 2) })
      : h("p", { class: "muted", text: "The stored spec cannot be read." }));

  body.replaceChildren(head, replicas, events, spec);
  logsPanel(detail, admin);
}

// The controller records conditions at the end of a pass; the replica counts are live. When they disagree
// (a pass is replacing a replica), say so rather than show "Ready" beside "0/1 ready" without a word.
function staleConditions(detail) {
  const ready = detail.conditions.find((c) => c.type === "Ready");
  const claimsReady = ready && ready.status === "True";
  if (!claimsReady || detail.replicasReady >= detail.replicasWanted) return null;
  return h("p", { class: "note small" }, `Recorded at the last sync; since then the replicas changed: `,
    h("strong", { text: `${detail.replicasReady}/${detail.replicasWanted} ready now` }), ".");
}

function replicaRow(detail, r, admin) {
  const stale = r.specHash !== detail.specHash;
  const crashed = r.crashCount > 0;
  const crash = crashed ? h("div", { class: "crash small" },
    h("strong", { text: "CrashLoopBackOff" }),
    `: failed ${r.crashCount === 1 ? "once" : `${r.crashCount} times in a row`}`,
    r.lastExitCode !== null && r.lastExitCode !== undefined ? `, exit code ${r.lastExitCode}` : null,
    r.retryAfter && new Date(r.retryAfter) > new Date() ? [", next try ", timeAgo(r.retryAfter, true)] : null,
    r.lastLog ? h("pre", { class: "log-tail", text: r.lastLog }) : null) : null;
  return h("tr", { "data-replica": r.name },
    h("th", { scope: "row" }, r.name, r.gpus.length ? h("div", { class: "muted small", text: `GPU ${r.gpus.join(", ")}` }) : null,
      // At phone width the worker and revision columns fold in here.
      h("div", { class: "phone-only muted small" }, `on ${r.worker}`, h("br"), r.revision ? sha(r.revision) : "no revision",
        stale ? h("div", { class: "warn-text", text: "older spec" }) : null)),
    h("td", { class: "wide-only", text: r.worker }),
    h("td", {}, badge(r.status, TONE[r.status] || "none"),
      r.message ? h("div", { class: "muted small message-text", text: r.message }) : null, crash),
    h("td", { class: "wide-only" }, r.revision ? sha(r.revision) : "—", stale ? h("div", { class: "small warn-text", text: "older spec" }) : null),
    h("td", { class: "wide-only small" }, timeAgo(r.updatedAt)),
    admin ? h("td", { class: "wide-only small" }, r.endpoint ? h("code", { text: r.endpoint }) : "—") : null);
}

// -- live logs: one WebSocket to a replica's container output, opened and closed by the user ---------------

function logsPanel(detail, admin) {
  const host = $("deployment-logs");
  if (!admin) {
    closeLogs();
    host.replaceChildren(h("section", { class: "panel", "aria-labelledby": "logs-title" },
      h("h2", { id: "logs-title", text: "Live logs" }),
      h("p", { class: "muted", text: "Reading logs needs an admin's login: engines may log prompts." })));
    return;
  }
  if (!logs || logs.deployment !== detail.name) {
    closeLogs();
    logs = makeLogsPanel(detail.name);
    host.replaceChildren(logs.panel);
  }
  // The replica choices follow the detail; the chosen one stays chosen while it exists.
  const options = detail.replicas.map((r) => String(r.ordinal));
  const shown = [...logs.select.options].map((o) => o.value);
  if (options.join() !== shown.join()) {
    const chosen = logs.select.value;
    logs.select.replaceChildren(...detail.replicas.map((r) =>
      h("option", { value: String(r.ordinal), text: `${r.name} on ${r.worker} (${r.status})` })));
    if (options.includes(chosen)) logs.select.value = chosen;
  }
  logs.button.disabled = !options.length && !logs.ws;
}

function makeLogsPanel(deployment) {
  const select = h("select", { id: "logs-replica" });
  const button = h("button", { type: "button", id: "logs-toggle", text: "Stream logs" });
  const note = h("p", { class: "muted small", id: "logs-note", role: "status", text: "Not streaming." });
  const output = h("pre", { class: "logs", id: "logs-output", role: "log", tabindex: "0", "aria-label": "Log lines" });
  const panel = h("section", { class: "panel", "aria-labelledby": "logs-title" },
    h("div", { class: "panel-head" }, h("h2", { id: "logs-title", text: "Live logs" })),
    h("div", { class: "logs-controls" },
      h("label", { for: "logs-replica", text: "Replica" }), select, button),
    note, output);
  const state = { deployment, panel, select, button, output, note, ws: null };
  button.addEventListener("click", () => (state.ws ? stopLogs(state, "Stopped.") : startLogs(state)));
  select.addEventListener("change", () => {
    if (state.ws) {
      stopLogs(state, null);
      startLogs(state);
    }
  });
  return state;
}

function startLogs(state) {
  const ordinal = state.select.value;
  if (ordinal === "") return;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  // Browsers cannot set headers on a WebSocket: the server takes the login token as ?token= (logs.py).
  const url = `${scheme}://${location.host}/api/deployments/${encodeURIComponent(state.deployment)}/logs` +
    `?replica=${encodeURIComponent(ordinal)}&tail=100&token=${encodeURIComponent(token)}`;
  const ws = new WebSocket(url);
  state.ws = ws;
  state.output.replaceChildren();
  state.note.textContent = `Connecting to ${state.deployment}/${ordinal}…`;
  state.button.textContent = "Stop";
  ws.addEventListener("open", () => {
    if (state.ws === ws) state.note.textContent = `Streaming ${state.deployment}/${ordinal} (the last 100 lines first).`;
  });
  ws.addEventListener("message", (event) => {
    if (state.ws !== ws) return;
    const out = state.output;
    const atBottom = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    out.append(h("span", { class: "line", text: String(event.data) }));
    while (out.childElementCount > LOG_LINES) out.firstElementChild.remove();
    if (atBottom) out.scrollTop = out.scrollHeight;
  });
  ws.addEventListener("close", (event) => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.button.textContent = "Stream logs";
    state.note.textContent = closeText(event);
  });
}

// The server's close codes (logs.py): 4000 + the HTTP status it stands for, with a reason.
function closeText(event) {
  if (event.code === 1000) return "The stream ended: the container stopped.";
  const what = { 4401: "Not logged in", 4403: "Not allowed", 4404: "Not found", 4502: "The worker failed",
    4503: "The server cannot reach the workers" }[event.code];
  const reason = event.reason || (event.code === 1006 ? "the connection was lost" : `closed (${event.code})`);
  return `${what ? `${what}: ` : ""}${reason}`;
}

function stopLogs(state, message) {
  const ws = state.ws;
  state.ws = null;
  if (ws) ws.close(1000);
  state.button.textContent = "Stream logs";
  if (message) state.note.textContent = message;
}

function closeLogs() {
  if (!logs) return;
  stopLogs(logs, null);
  logs = null;
  $("deployment-logs").replaceChildren();
}

// -- sync history -----------------------------------------------------------------------------------------

function syncHistory(d) {
  const runs = d.sync.runs;
  if (!runs.length) return h("p", { class: "muted", text: "No sync runs yet." });
  return h("ol", { class: "runs" }, runs.map((run) => h("li", {}, syncRun(run))));
}

function syncRun(run) {
  const details = h("details", { class: "run panel", "data-run": run.id, open: openRuns.has(run.id) },
    h("summary", {},
      h("span", { class: "run-title" }, h("strong", { text: `#${run.id}` }), " ", runSummary(run)),
      run.subject ? h("div", { class: "muted small", text: run.subject }) : null),
    runBody(run));
  details.addEventListener("toggle", () => {
    if (details.open) openRuns.add(run.id);
    else openRuns.delete(run.id);
  });
  return details;
}

function runBody(run) {
  const plan = run.plan;
  const result = run.result;
  const outcome = new Map((result ? result.actions : []).map((a) => [`${a.kind} ${a.replica}`, a]));
  const parts = [h("dl", { class: "facts" },
    item("Started", timeAgo(run.startedAt)),
    item("Finished", run.finishedAt ? timeAgo(run.finishedAt) : "still running"),
    item("Trigger", run.trigger),
    item("Source", run.source))];
  if (run.error) parts.push(h("p", { class: "reason", text: run.error }));
  if (!plan) return parts;
  parts.push(h("h3", { text: "Planned changes" }));
  parts.push(plan.actions.length ? h("div", { class: "table-wrap" }, h("table", {},
    h("thead", {}, h("tr", {}, ["Change", "Replica", "Why", "Result"].map((c) => h("th", { scope: "col", text: c })))),
    h("tbody", {}, plan.actions.map((a) => {
      const done = outcome.get(`${a.kind} ${a.deployment}/${a.replica}`);
      return h("tr", {},
        h("td", {}, badge(a.kind, { create: "ok", delete: "bad", recreate: "warn", update: "busy" }[a.kind] || "none")),
        h("td", {}, h("span", { class: "nowrap" }, deploymentLink(a.deployment), `/${a.replica}`),
          a.placement ? h("div", { class: "muted small", text: `on ${a.placement.worker}${a.placement.gpus.length ? ` GPU ${a.placement.gpus.join(", ")}` : ""}` }) : null),
        h("td", {}, a.reason,
          a.changes.length ? h("ul", { class: "changes small" }, a.changes.map((c) =>
            h("li", {}, h("code", { text: c.path }), `: ${brief(c.old)} → ${brief(c.new)}`))) : null),
        h("td", {}, done ? [badge(done.ok ? "done" : "failed", done.ok ? "ok" : "bad"),
          done.seconds !== null && done.seconds !== undefined ? h("span", { class: "muted small", text: ` ${done.seconds} s` }) : null,
          done.message ? h("div", { class: "small message-text", text: done.message }) : null]
          : h("span", { class: "muted", text: result ? "not done" : "pending" })));
    })))) : h("p", { class: "muted small", text: "Nothing to change: every replica was as the commit asks." }));
  if (plan.unplaceable.length) {
    parts.push(h("h3", { text: "Could not be placed" }),
      h("ul", { class: "reasons" }, plan.unplaceable.map((u) => h("li", {}, h("strong", { text: `${u.deployment}/${u.replica}` }), `: ${u.reason}`))));
  }
  if (plan.notes.length) parts.push(h("h3", { text: "Notes" }), h("ul", { class: "small" }, plan.notes.map((n) => h("li", { text: n }))));
  if (result && result.notActedOn.length) {
    parts.push(h("h3", { text: "Not acted on" }),
      h("ul", { class: "reasons" }, result.notActedOn.map((u) => h("li", {}, h("strong", { text: u.replica }), `: ${u.reason}`))));
  }
  if (result && result.errors.length) {
    parts.push(h("h3", { text: "Errors" }), h("ul", { class: "reasons" }, result.errors.map((e) => h("li", { text: e }))));
  }
  return parts;
}

function brief(value) {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text === undefined ? "—" : text.length > 80 ? `${text.slice(0, 77)}…` : text;
}

// -- events -----------------------------------------------------------------------------------------------

function eventList(events) {
  const type = $("events-type").value;
  const shown = type ? events.filter((e) => e.type === type) : events;
  return eventTable(shown, true);
}

function eventTable(events, withObject) {
  if (!events.length) return h("p", { class: "muted", text: "No events." });
  return h("div", { class: "table-wrap" }, h("table", { class: "events" },
    h("thead", {}, h("tr", {},
      h("th", { scope: "col", text: "When" }),
      withObject ? h("th", { scope: "col", text: "Object" }) : null,
      h("th", { scope: "col", text: "Reason and message" }))),
    h("tbody", {}, events.map((e) => h("tr", { "data-event": e.id, "data-type": e.type },
      h("td", { class: "nowrap" }, timeAgo(e.at), h("div", {}, badge(e.type, e.type === "Warning" ? "warn" : "none"))),
      withObject ? h("td", {}, e.objectKind === "Deployment" ? deploymentLink(e.objectName)
        : [h("span", { class: "muted small", text: `${e.objectKind}/` }), e.objectName]) : null,
      h("td", {}, h("strong", { text: e.reason }), h("div", { class: "message-text", text: e.message })))))));
}

// -- usage ------------------------------------------------------------------------------------------------

function usageWindow() {
  const chosen = $("usage-window").value;
  return chosen in USAGE_WINDOWS ? chosen : "24h";
}

function usage(rows) {
  const admin = me && me.role === "admin";
  const scope = h("p", { class: "muted", text: admin
    ? "Every key's usage (you are an admin). Written every few seconds, so the current hour lags slightly."
    : "Your own keys' usage only. Written every few seconds, so the current hour lags slightly." });
  if (!rows.length) return [scope, h("p", { class: "muted", text: "No requests in this window." })];
  const byKey = new Map(); // key id + model -> totals
  const byModel = new Map();
  for (const r of rows) {
    const id = `${r.key_id}\u0000${r.model}`;
    if (!byKey.has(id)) byKey.set(id, { key: r.key_name || (r.key_id === null ? "deleted key" : `key ${r.key_id}`), user: r.user, model: r.model, ...zero() });
    add(byKey.get(id), r);
    if (!byModel.has(r.model)) byModel.set(r.model, { model: r.model, ...zero() });
    add(byModel.get(r.model), r);
  }
  const models = [...byModel.values()].sort((a, b) => b.total - a.total || b.requests - a.requests);
  const most = Math.max(1, ...models.map((m) => m.total));
  const perModel = h("section", { class: "panel", "aria-labelledby": "usage-models" },
    h("h2", { id: "usage-models", text: "Per model" }),
    h("ul", { class: "model-usage" }, models.map((m) => h("li", { "data-model": m.model },
      h("div", { class: "model-usage-head" }, h("strong", { text: m.model }),
        h("span", { class: "muted small", text: `${plural(m.requests, "request")} · ${plural(m.errors, "error")} · ${plural(m.total, "token")}` })),
      h("div", { class: "bar", role: "img", "aria-label": `${m.model}: ${count(m.total)} tokens` }, segment("ours", m.total, most))))));
  const keys = [...byKey.values()].sort((a, b) => a.key.localeCompare(b.key) || a.model.localeCompare(b.model));
  const perKey = h("section", { class: "panel", "aria-labelledby": "usage-keys" },
    h("h2", { id: "usage-keys", text: "Per key and model" }),
    h("div", { class: "table-wrap" }, h("table", { class: "usage" },
      h("thead", {}, h("tr", {},
        h("th", { scope: "col", text: "Key" }), h("th", { scope: "col", text: "Model" }),
        h("th", { scope: "col", class: "num", text: "Requests" }), h("th", { scope: "col", class: "num wide-only", text: "Errors" }),
        h("th", { scope: "col", class: "num", text: "Tokens in / out" }),
        h("th", { scope: "col", class: "num wide-only", text: "Mean latency" }),
        h("th", { scope: "col", class: "num wide-only", text: "Mean TTFT" }))),
      h("tbody", {}, keys.map((k) => h("tr", { "data-key": k.key },
        h("th", { scope: "row" }, k.key, admin && k.user ? h("div", { class: "muted small", text: k.user }) : null),
        h("td", { text: k.model }),
        h("td", { class: "num" }, count(k.requests),
          k.errors ? h("div", { class: "phone-only error-text small", text: `${count(k.errors)} failed` }) : null),
        h("td", { class: `num wide-only${k.errors ? " error-text" : ""}`, text: count(k.errors) }),
        h("td", { class: "num", text: `${count(k.prompt)} / ${count(k.completion)}` }),
        h("td", { class: "num wide-only", text: k.requests ? `${Math.round(k.latency / k.requests)} ms` : "—" }),
        h("td", { class: "num wide-only", text: k.requests ? `${Math.round(k.ttft / k.requests)} ms` : "—" }))))))); 
  return [scope, perModel, perKey];
}

function zero() {
  return { requests: 0, errors: 0, prompt: 0, completion: 0, total: 0, latency: 0, ttft: 0 };
}

function add(totals, row) {
  totals.requests += row.requests;
  totals.errors += row.errors;
  totals.prompt += row.prompt_tokens;
  totals.completion += row.completion_tokens;
  totals.total += row.total_tokens;
  totals.latency += row.latency_ms_sum;
  totals.ttft += row.ttft_ms_sum;
}

function count(n) {
  return n.toLocaleString("en");
}

function plural(n, noun) {
  return `${count(n)} ${noun}${n === 1 ? "" : "s"}`;
}

// -- small pieces -----------------------------------------------------------------------------------------

const TONE = { ready: "ok", starting: "busy", pending: "busy", draining: "none", deleting: "none", failed: "bad", missing: "bad" };

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
  return `${span(s)} ago`;
}

function span(s) {
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

// A moment as "12 s ago" (or, `ahead`, "in 12 s"), the exact time in its title.
function timeAgo(iso, ahead) {
  const text = ahead ? `in ${span(Math.max(0, Math.round((new Date(iso).getTime() - Date.now()) / 1000)))}` : ago(iso);
  return h("time", { datetime: iso, title: new Date(iso).toLocaleString(), text });
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
  if (data && data.extra.key !== extrasKey(currentRoute())) refreshSoon();
});
$("events-type").addEventListener("change", render);
DARK.addEventListener("change", () => {
  if (charts) charts.shape = null; // drawn again in the other scheme's colours
  render();
});
$("usage-window").addEventListener("change", () => {
  render();
  refreshSoon();
});

if (token) start();
else showLogin(null);
