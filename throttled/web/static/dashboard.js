// The throttled dashboard: plain JavaScript, no build step. Every value from the API is put
// on the page as text (textContent, never innerHTML). The admin token is kept in this tab's
// sessionStorage and sent as a bearer header, never in a URL.
"use strict";

(() => {
  const TOKEN_KEY = "throttled.adminToken";
  const REFRESH_MS = 5000;
  const STATES = new Set(["paused", "releasing", "held", "draining", "idle"]);
  const HEALTH = new Set(["healthy", "degraded", "unhealthy"]);
  const SOURCES = { override: "operator override", input_fields: "input fields",
                    config: "admin config", defaults: "defaults" };

  const NO_POINTS = { show: false };
  const $ = (id) => document.getElementById(id);
  let timer = null;
  let chart = null;
  let busy = false;
  let again = false; // (a refresh asked for while one runs: run once more after it)

  // -- small helpers ---------------------------------------------------------------------

  /** An element with text children (strings become text nodes) and a few properties. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (name === "className") node.className = value;
      else if (name === "title") node.title = String(value);
      else if (name === "onclick") node.addEventListener("click", value);
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    const m = Math.round(s / 60);
    if (m < 60) return `${m} min`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ${m % 60} min`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }

  function when(iso) {
    if (!iso) return "—";
    if (iso === "never") return "never";
    const seconds = (Date.parse(iso) - Date.now()) / 1000;
    if (Number.isNaN(seconds)) return "—";
    if (Math.abs(seconds) < 5) return "now";
    return seconds > 0 ? `in ${duration(seconds)}` : `${duration(-seconds)} ago`;
  }

  function localTime(iso) {
    const t = Date.parse(iso);
    return Number.isNaN(t) ? String(iso) : new Date(t).toLocaleString();
  }

  const count = (n) => Number(n).toLocaleString();

  function badge(text, kind) {
    return el("span", { className: `badge badge-${kind}` }, text);
  }

  // -- the API ---------------------------------------------------------------------------

  class Unauthorized extends Error {}

  async function api(method, path) {
    const token = sessionStorage.getItem(TOKEN_KEY) || "";
    const response = await fetch(path, {
      method,
      headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
    });
    const body = await response.json().catch(() => null);
    const message = body && typeof body.message === "string" ? body.message : `HTTP ${response.status}`;
    if (response.status === 401 || response.status === 403) throw new Unauthorized(message);
    if (!response.ok) throw new Error(message);
    return body;
  }

  // -- queues ----------------------------------------------------------------------------

  function queueRow(queue, doneByQueue, unconnected) {
    const state = STATES.has(queue.state) ? queue.state : "idle";
    const stateCell = el("td", {}, badge(queue.state, state));
    if (queue.at_risk) stateCell.append(" ", badge("at risk", "risk"));
    if (queue.held) stateCell.append(el("div", { className: "small muted" }, queue.held));

    const backlog = el("td", { className: "num" }, count(queue.backlog));
    if (queue.failed || queue.expired) {
      backlog.append(el("div", { className: "small muted" },
        `${count(queue.failed)} failed, ${count(queue.expired)} expired`));
    }

    const rate = queue.rate;
    const source = queue.rate_sources && queue.rate_sources.rate;
    const rateCell = el("td", {}, rate ? rate.text : "unreadable",
      el("div", { className: "small muted" }, `from ${SOURCES[source] || source || "—"}`));

    const done = doneByQueue.get(queue.id) || 0;
    const total = done + queue.backlog;
    const progress = el("td", {},
      el("progress", { max: Math.max(total, 1), value: total ? done : 0,
                       "aria-label": `${done} of ${total} sent in the last hour` }),
      el("div", { className: "small muted" }, `${count(done)} sent, ${count(queue.backlog)} left`));

    const waiting = unconnected.has(queue.portal_id) && queue.backlog > 0;
    const eta = queue.paused ? "paused" : waiting ? "when connected" : when(queue.drains_at);
    const drains = el("td", { title: queue.drains_at && queue.drains_at !== "never"
      ? localTime(queue.drains_at) : undefined }, eta);
    if (waiting) {
      drains.append(el("div", { className: "small warn" }, "waits for the portal's connection"));
    } else if (queue.beats_oldest_deadline === false) {
      drains.append(el("div", { className: "small warn" }, "after the oldest deadline"));
    }

    const op = queue.paused ? "resume" : "pause";
    const button = el("button", {
      type: "button",
      className: queue.paused ? "resume" : "pause",
      "aria-label": `${queue.paused ? "Resume" : "Pause"} queue ${queue.key}`,
      dataset: { focusKey: `queue-${queue.id}` },
      onclick: () => operate(button, queue.id, op),
    }, queue.paused ? "Resume" : "Pause");

    return el("tr", { dataset: { queueId: queue.id, state } },
      el("th", { scope: "row" }, el("code", {}, queue.key),
        el("div", { className: "small muted" }, `#${queue.id} · portal ${queue.portal_id}`)),
      stateCell, backlog, rateCell, progress, drains, el("td", {}, button));
  }

  function renderQueues(page, throughput, portals) {
    const unconnected = new Set(portals.filter((p) => p.connection !== "connected").map((p) => p.portal_id));
    const doneByQueue = new Map(throughput.done_by_queue.map((q) => [q.queue_id, q.done]));
    const rows = page.queues.map((q) => queueRow(q, doneByQueue, unconnected));
    $("queues").tBodies[0].replaceChildren(...rows);
    $("queues-empty").hidden = rows.length > 0;
    const backlog = page.queues.reduce((sum, q) => sum + q.backlog, 0);
    const paused = page.queues.filter((q) => q.paused).length;
    const more = page.next_cursor ? " (the most urgent shown)" : "";
    $("queues-summary").textContent =
      `${rows.length} queues${more}, ${count(backlog)} waiting, ${paused} paused`;
  }

  async function operate(button, id, op) {
    button.disabled = true;
    try {
      await api("POST", `/api/queues/${encodeURIComponent(id)}/${op}`);
      await refresh();
    } catch (error) {
      failed(error);
      button.disabled = false;
    }
  }

  // -- portals and failures --------------------------------------------------------------

  function portalRow(portal) {
    const health = HEALTH.has(portal.health) ? portal.health : "unhealthy";
    const connection = el("td", {}, badge(portal.connection.replace("_", " "),
      portal.connection === "connected" ? "ok" : "bad"));
    const problem = portal.disconnected_reason || portal.last_refresh_error;
    if (problem) connection.append(el("div", { className: "small warn" }, problem));
    const detail = [`${(portal.error_rate * 100).toFixed(0)}% errors`];
    if (portal.average_latency_ms !== null) detail.push(`${Math.round(portal.average_latency_ms)} ms`);
    if (portal.consecutive_failures) detail.push(`${portal.consecutive_failures} failing in a row`);
    return el("tr", {},
      el("th", { scope: "row" }, String(portal.portal_id),
        portal.hub_domain ? el("div", { className: "small muted" }, portal.hub_domain) : null),
      connection,
      el("td", {}, badge(portal.health, health), el("div", { className: "small muted" }, detail.join(", "))),
      el("td", { className: "num" }, count(portal.backlog.pending)));
  }

  function failureRow(failure) {
    return el("tr", {},
      el("td", { title: localTime(failure.completed_at) }, when(failure.completed_at)),
      el("td", {}, badge(failure.state, failure.state === "expired" ? "warn" : "bad")),
      el("td", {}, el("code", {}, failure.callback_id),
        el("div", { className: "small muted" }, failure.queue_key || `queue #${failure.queue_id}`)),
      el("td", { className: "error-text" }, failure.last_error || "—"));
  }

  function renderTable(id, items, row) {
    $(id).tBodies[0].replaceChildren(...items.map(row));
    $(`${id}-empty`).hidden = items.length > 0;
  }

  // -- throughput chart ------------------------------------------------------------------

  function renderThroughput(data) {
    const t = data.points.map((p) => p.t);
    const series = ["done", "failed", "expired"].map((k) => data.points.map((p) => p[k]));
    const [done, failedCounts, expired] = series.map((s) => s.reduce((a, b) => a + b, 0));
    const perMinute = data.points.length > 1 ? data.points[data.points.length - 2].done : 0;
    $("throughput-summary").textContent = `Last hour: ${count(done)} done, ${count(failedCounts)} failed, `
      + `${count(expired)} expired; ${count(perMinute)} done in the last whole minute.`;
    const box = $("chart");
    box.setAttribute("role", "img");
    box.setAttribute("aria-label", $("throughput-summary").textContent);
    if (typeof window.uPlot !== "function") return; // (the summary above still says it)
    const width = Math.max(box.clientWidth, 300);
    if (chart === null) {
      chart = new window.uPlot({
        width,
        height: 220,
        scales: { y: { range: (u, min, max) => [0, Math.max(max, 5)] } },
        legend: { live: false },
        axes: [{}, { label: "per minute", size: 60 }],
        series: [
          {},
          { label: "done", stroke: "#1a7f37", fill: "rgba(26,127,55,0.12)", width: 2, points: NO_POINTS },
          { label: "failed", stroke: "#cf222e", width: 2, points: NO_POINTS },
          { label: "expired", stroke: "#bc4c00", width: 2, dash: [6, 4], points: NO_POINTS },
        ],
      }, [t, ...series], box);
    } else {
      if (chart.width !== width) chart.setSize({ width, height: 220 });
      chart.setData([t, ...series]);
    }
  }

  // -- refreshing, signing in and out ----------------------------------------------------

  async function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    clearTimeout(timer);
    try {
      const [queues, portals, failures, throughput] = await Promise.all([
        api("GET", "/api/queues?sort=urgency&limit=200"),
        api("GET", "/api/portals"),
        api("GET", "/api/failures?limit=20"),
        api("GET", "/api/throughput?minutes=60"),
      ]);
      const focused = document.activeElement && document.activeElement.dataset.focusKey;
      renderQueues(queues, throughput, portals.portals);
      renderTable("portals", portals.portals, portalRow);
      renderTable("failures", failures.failures, failureRow);
      renderThroughput(throughput);
      if (focused) {
        const button = document.querySelector(`[data-focus-key="${CSS.escape(focused)}"]`);
        if (button) button.focus();
      }
      const status = $("status");
      status.className = "";
      status.textContent = `Updated ${new Date().toLocaleTimeString()}; refreshes every ${REFRESH_MS / 1000} s`;
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
    } catch (error) {
      failed(error);
    } finally {
      busy = false;
      if (sessionStorage.getItem(TOKEN_KEY)) timer = setTimeout(refresh, again ? 0 : REFRESH_MS);
      again = false;
    }
  }

  function failed(error) {
    if (error instanceof Unauthorized) {
      signOut(error.message);
      return;
    }
    const status = $("status");
    status.className = "error";
    status.textContent = `Could not update (${error.message}); retrying`;
  }

  function showLogin(message) {
    $("dashboard").hidden = true;
    $("logout").hidden = true;
    $("refresh").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("status").textContent = "Not signed in";
    $("token").focus();
  }

  function showDashboard() {
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("logout").hidden = false;
    $("refresh").hidden = false;
    refresh();
  }

  function signOut(message) {
    clearTimeout(timer);
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(message);
  }

  function start() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault(); // (never a form submission: the token stays out of any URL)
      const input = $("token");
      const token = input.value.trim();
      input.value = "";
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      showDashboard();
    });
    $("logout").addEventListener("click", () => signOut(""));
    $("refresh").addEventListener("click", () => refresh());
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && sessionStorage.getItem(TOKEN_KEY)) refresh();
    });
    window.addEventListener("resize", () => {
      if (chart !== null) chart.setSize({ width: Math.max($("chart").clientWidth, 300), height: 220 });
    });
    if (sessionStorage.getItem(TOKEN_KEY)) showDashboard();
    else showLogin("");
  }

  start();
})();
