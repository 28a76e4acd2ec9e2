// filch web UI: plain JavaScript over the node's JSON API (/api/v1), no dependencies.
// Views are chosen by the URL fragment: #/tasks, #/tasks/<id>, #/arrays/<id>, #/nodes.
// The batch fields (arrays, dependencies, attempts) are drawn by batch.js.
"use strict";

// Refresh periods: quick enough that a task's state change shows within a glance,
// slow enough that a few open tabs cost the daemon nothing.
const TASKS_EVERY_MS = 2000;
const TASK_EVERY_MS = 2000;
const NODES_EVERY_MS = 3000;
const READY_EVERY_MS = 5000;
// The list reads at most this many tasks (pages of 1000) and shows the newest ROWS_SHOWN.
const MAX_PAGES = 10;
const ROWS_SHOWN = 300;
// A live log keeps at most this much text in the page, dropping the oldest.
const LOG_KEEP_CHARS = 2_000_000;
// How long the "Click again to cancel" button waits for the second click.
const CONFIRM_MS = 4000;

const $ = (id) => document.getElementById(id);

// -- small helpers --------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// The session is an HttpOnly cookie (set by /login, invisible to this script) that
// same-origin fetches carry. A 401 means there is none (or it expired, or was signed
// out): sign in again.
function toSignIn() {
  window.location.assign("/login");
}

// State-changing calls send JSON: the server refuses cookie-authenticated POSTs without it
// (a cross-site form cannot send that content type).
async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  if (options.method && options.method !== "GET") headers["Content-Type"] = "application/json";
  const response = await fetch(path, { credentials: "same-origin", headers, ...options });
  if (response.status === 401) {
    toSignIn();
    throw new ApiError(401, "not signed in");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, (body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

// Sizes and CPU spelled as the CLI spells them (node/units.py): 64Mi, 1.5Gi, 0.25 cores.
function formatSize(bytes) {
  const units = [["Ti", 2 ** 40], ["Gi", 2 ** 30], ["Mi", 2 ** 20], ["Ki", 2 ** 10]];
  for (const [suffix, size] of units) {
    if (bytes >= size) {
      return bytes % size === 0 ? `${bytes / size}${suffix}` : `${(bytes / size).toFixed(1)}${suffix}`;
    }
  }
  return String(bytes);
}

function formatCpu(cores) {
  return String(Math.round(cores * 1000) / 1000);
}

// Ages as the CLI prints them: 45s, 3m12s, 2h5m, 6d.
function formatDuration(seconds) {
  const whole = Math.max(0, Math.floor(seconds));
  if (whole < 60) return `${whole}s`;
  const minutes = Math.floor(whole / 60);
  const secs = whole % 60;
  if (minutes < 10) return secs ? `${minutes}m${secs}s` : `${minutes}m`;
  if (minutes < 60) return `${minutes}m`;
  const hours = Math.floor(minutes / 60);
  if (hours < 24) return minutes % 60 ? `${hours}h${minutes % 60}m` : `${hours}h`;
  return `${Math.floor(hours / 24)}d`;
}

function ago(stamp) {
  if (!stamp) return "–";
  return `${formatDuration((Date.now() - Date.parse(stamp)) / 1000)} ago`;
}

// The command line as a shell would need it typed (like Python's shlex.join).
function shellJoin(words) {
  return words.map((word) =>
    word === "" ? "''" : /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, "'\"'\"'")}'`
  ).join(" ");
}

// Node ids are random: their first 8 digits tell nodes apart (as in `filch nodes`).
function shortId(id) {
  return id ? id.slice(0, 8) : "–";
}

// Task ids are UUIDv7: the leading digits are the submit time, shared by every task of
// the same moment, so the random tail is what tells tasks apart.
function shortTaskId(id) {
  return `…${id.slice(-8)}`;
}

function stateBadge(task) {
  // A task that finished badly reads as FAILED at a glance; its state stays in the tooltip.
  const failed = task.state === "COMPLETE" && (task.exit_code !== 0 || task.reason !== "EXITED");
  const badge = el("span", { class: `badge ${failed ? "FAILED" : task.state}`, text: task.state });
  badge.title = task.reason ? `${task.state} (${task.reason})` : task.state;
  return badge;
}

function outcome(task) {
  switch (task.reason) {
    case "EXITED": return `exit ${task.exit_code}`;
    case "OOM_KILLED": return "OOM killed";
    case "NODE_LOST": return "node lost";
    case "START_FAILED": return "start failed";
    case "TIMED_OUT": return "timed out";
    case "DEPENDENCY_FAILED": return "dependency failed";
    case "CANCELED": return "canceled";
    default: return task.message || "";
  }
}

function longOutcome(task) {
  switch (task.reason) {
    case "EXITED": return `exited with code ${task.exit_code}`;
    case "OOM_KILLED": return `killed for running out of memory (limit ${formatSize(task.memory_bytes)})`;
    case "NODE_LOST": return "lost with its node (restart is off)";
    case "START_FAILED": return "could not start";
    case "TIMED_OUT": return `stopped at its time limit (${formatSeconds(task.time_limit_seconds)})`;
    case "DEPENDENCY_FAILED": return `canceled: ${task.message || "a dependency failed"}`;
    case "CANCELED": return "canceled";
    default: return "";
  }
}

function cancelable(task) {
  return task.state === "PENDING" || task.state === "RUNNING";
}

// Who is signed in (GET /api/v1/whoami); null until known. A user cancels only its own
// tasks and sees only their commands: the daemon enforces both, the page just follows.
let me = null;
const HIDDEN_COMMAND = "hidden (another user's task)";

async function loadWhoAmI() {
  try {
    me = await api("/api/v1/whoami");
  } catch (error) {
    return;  // unknown (a 401 already went to the sign-in form): the daemon still decides
  }
  const badge = $("whoami");
  badge.replaceChildren(document.createTextNode(me.name),
    el("span", { class: "role", text: me.role }));
  badge.hidden = false;
}

function mayCancel(task) {
  return cancelable(task) && (!me || me.role === "admin" || task.owner === me.name);
}

function commandText(task) {
  return task.redacted ? HIDDEN_COMMAND : shellJoin([task.command, ...task.args]);
}

// A cancel button that asks for a second click before it acts: the second click POSTs to
// url (a task's or an array's cancel), then onDone(reply) runs with the JSON reply, or with
// null when the call failed (the failure is already in the banner).
function cancelButton(button, url, onDone) {
  let armed = null;
  button.textContent = button.dataset.label || "Cancel";
  button.classList.remove("confirm");
  button.disabled = false;
  button.onclick = async (event) => {
    event.stopPropagation();
    if (!armed) {
      button.textContent = "Click again to cancel";
      button.classList.add("confirm");
      armed = setTimeout(() => {
        armed = null;
        button.textContent = button.dataset.label || "Cancel";
        button.classList.remove("confirm");
      }, CONFIRM_MS);
      return;
    }
    clearTimeout(armed);
    armed = null;
    button.disabled = true;
    button.textContent = "Canceling…";
    let reply = null;
    try {
      reply = await api(url, { method: "POST", body: "{}" });
      showBanner(null);
    } catch (error) {
      showBanner(`Cancel failed: ${error.message}`);
      // Ready for another try: the task page keeps this button while the task runs.
      button.disabled = false;
      button.textContent = button.dataset.label || "Cancel";
    }
    onDone(reply);
  };
  return button;
}

function taskCancelUrl(taskId) {
  return `/api/v1/tasks/${encodeURIComponent(taskId)}/cancel`;
}

function arrayCancelUrl(arrayId) {
  return `/api/v1/arrays/${encodeURIComponent(arrayId)}/cancel`;
}

function showBanner(message) {
  const banner = $("banner");
  banner.textContent = message || "";
  banner.hidden = !message;
}

function setUpdated(id) {
  $(id).textContent = `updated ${new Date().toLocaleTimeString()}`;
}

// -- polling --------------------------------------------------------------------------------

// One timer per view; switching views stops the old one. Nothing polls in a hidden tab.
let pollTimer = null;

function poll(work, every) {
  clearTimeout(pollTimer);
  const tick = async () => {
    if (!document.hidden) await work();
    // every: milliseconds, or a function giving them (the task list's depends on the feed).
    pollTimer = setTimeout(tick, typeof every === "function" ? every() : every);
  };
  tick();
}

// -- live events (GET /api/v1/events) -------------------------------------------------------

// While the event stream is open the task list is redrawn when a task event arrives, not
// every TASKS_EVERY_MS; a slow poll stays as a safety net. When the stream cannot be had (a
// proxy that buffers, too many streams on the node, history compacted) the browser's
// EventSource gives up and the list polls as before; while it reconnects, it polls too.
const LIVE_SAFETY_MS = 30000;
// A burst of events (an array finishing) redraws the list once.
const EVENT_REDRAW_MS = 300;
const FEED_KEEP = 50;
let events = null;
let eventRedraw = null;

function tasksEvery() {
  return events && events.readyState === EventSource.OPEN ? LIVE_SAFETY_MS : TASKS_EVERY_MS;
}

function feedLine(event) {
  const who = event.type === "task" ? shortTaskId(event.task_id) : event.node_name || shortId(event.node_id);
  const where = event.type === "task" && event.node_name ? ` on ${event.node_name}` : "";
  const reason = event.reason ? ` (${event.reason})` : "";
  return el("li", { text: `#${event.revision} ${event.type} ${who} ${event.state}${reason}${where}` });
}

function startEvents() {
  if (!window.EventSource) return;
  const source = new EventSource("/api/v1/events");
  events = source;
  source.onopen = () => {
    $("event-card").hidden = false;
    $("event-status").textContent = "";
  };
  source.onmessage = (message) => {
    let data;
    try { data = JSON.parse(message.data); } catch (_) { return; }
    const feed = $("event-feed");
    for (const event of data.events || []) feed.prepend(feedLine(event));
    while (feed.children.length > FEED_KEEP) feed.lastChild.remove();
    if ((data.events || []).some((event) => event.type === "task") && !$("view-tasks").hidden
        && $("auto-refresh").checked) {
      clearTimeout(eventRedraw);
      eventRedraw = setTimeout(refreshTasks, EVENT_REDRAW_MS);
    }
  };
  source.onerror = () => {
    $("event-status").textContent = source.readyState === EventSource.CLOSED
      ? "— stream unavailable; polling" : "— reconnecting…";
    if (source.readyState === EventSource.CLOSED) events = null;
    // Polling takes over at once (tasksEvery() now answers TASKS_EVERY_MS).
    if (!$("view-tasks").hidden) poll(refreshTasks, tasksEvery);
  };
}

// -- tasks ----------------------------------------------------------------------------------

let stateFilter = "";
// #/arrays/<id>: the list shows that array's tasks only.
let arrayFilter = null;
let lastTasks = [];
// Node names by id, from the node list: tasks carry only the node's id and address.
let nodeNames = new Map();

async function refreshNodeNames() {
  try {
    const { nodes } = await api("/api/v1/nodes");
    nodeNames = new Map(nodes.map((node) => [node.id, node.name]));
  } catch (_) {
    // Names are a nicety: ids still show, and the task list reports its own errors.
  }
}

function nodeLabel(nodeId) {
  return nodeId ? nodeNames.get(nodeId) || shortId(nodeId) : "–";
}

async function fetchAllTasks() {
  const tasks = [];
  let token = "";
  let truncated = false;
  for (let page = 0; page < MAX_PAGES; page++) {
    const params = new URLSearchParams({ page_size: "1000" });
    if (token) params.set("page_token", token);
    if (arrayFilter) params.set("array_id", arrayFilter);
    const body = await api(`/api/v1/tasks?${params}`);
    tasks.push(...body.tasks);
    if (!body.next_page_token || body.next_page_token === token) return { tasks, truncated };
    token = body.next_page_token;
    truncated = page === MAX_PAGES - 1;
  }
  return { tasks, truncated };
}

async function refreshTasks() {
  if (!$("auto-refresh").checked && lastTasks.length) return;
  const view = arrayFilter;
  try {
    const [{ tasks, truncated }] = await Promise.all([fetchAllTasks(), refreshNodeNames()]);
    // The page moved to another list meanwhile: this answer is not its (its own refresh is).
    if (view !== arrayFilter) return;
    lastTasks = tasks;
    // Redrawing would disarm a "Click again to cancel" button under the pointer.
    if (document.querySelector("#tasks-body button.confirm")) return;
    showBanner(null);
    renderTasks(tasks, truncated);
    setUpdated("tasks-updated");
  } catch (error) {
    showBanner(`Cannot list tasks: ${error.message}`);
  }
}

function renderTasks(tasks, truncated) {
  const counts = { "": tasks.length, PENDING: 0, RUNNING: 0, COMPLETE: 0, CANCELED: 0 };
  for (const task of tasks) counts[task.state] = (counts[task.state] || 0) + 1;
  const plus = truncated ? "+" : "";
  // Held tasks (dependencies, array, retry back-off) are pending but not in the queue.
  const held = tasks.filter((task) => task.state === "PENDING" && task.hold).length;
  $("queue-depth").textContent = `${counts.PENDING - held}${plus}`;
  $("stat-queue").classList.toggle("busy", counts.PENDING - held > 0);
  $("queue-held").textContent = held ? ` · ${held} held (dependencies, arrays, retries)` : "";
  $("count-running").textContent = counts.RUNNING;
  $("count-complete").textContent = `${counts.COMPLETE}${plus}`;
  $("count-canceled").textContent = `${counts.CANCELED}${plus}`;
  renderArrayCancel(arrayFilter, tasks, truncated);
  for (const badge of document.querySelectorAll("[data-count]")) {
    badge.textContent = counts[badge.dataset.count] ?? 0;
  }

  // Newest first: ids are UUIDv7, so the API lists oldest first.
  const shown = tasks.filter((task) => !stateFilter || task.state === stateFilter).reverse();
  const body = $("tasks-body");
  body.replaceChildren(...shown.slice(0, ROWS_SHOWN).map(taskRow));
  const empty = $("tasks-empty");
  empty.hidden = shown.length > 0;
  if (!tasks.length) {
    empty.replaceChildren("No tasks yet. Submit one with ", el("code", { text: "filch submit -- echo hello" }));
  } else {
    empty.textContent = `No ${stateFilter.toLowerCase()} tasks.`;
  }
  const foot = $("tasks-foot");
  foot.hidden = shown.length <= ROWS_SHOWN && !truncated;
  foot.textContent = `Showing the newest ${Math.min(ROWS_SHOWN, shown.length)} of ${shown.length}${plus} tasks; ` +
    "`filch ls` lists them all.";
}

function taskRow(task) {
  const href = `#/tasks/${task.id}`;
  const actions = el("td", { class: "actions" });
  if (mayCancel(task)) {
    const button = el("button", { type: "button", class: "danger small", "data-label": "Cancel" });
    actions.append(cancelButton(button, taskCancelUrl(task.id), refreshTasks));
  }
  const row = el("tr", { "data-id": task.id, onclick: () => { location.hash = href; } },
    el("td", {}, el("a", { href, class: "mono", text: shortTaskId(task.id), title: task.id })),
    el("td", { class: "name", text: task.name || "–", title: task.name }),
    el("td", {}, stateBadge(task)),
    el("td", { class: task.redacted ? "command hidden-command" : "command", text: commandText(task) }),
    el("td", { text: nodeLabel(task.node_id), title: task.node_id ? `${task.node_id} at ${task.node_address}` : "" }),
    el("td", { class: "num", text: formatCpu(task.cpu) }),
    el("td", { class: "num", text: formatSize(task.memory_bytes) }),
    ...batchCells(task),
    el("td", { text: ago(task.submitted_at), title: task.submitted_at || "" }),
    el("td", { class: "result", text: outcome(task), title: task.message || "" }),
    actions,
  );
  return row;
}

function setStateFilter(state) {
  stateFilter = state;
  for (const button of $("state-filter").querySelectorAll("button")) {
    button.classList.toggle("active", button.dataset.state === state);
  }
  renderTasks(lastTasks, false);
}

// -- one task -------------------------------------------------------------------------------

// The log being shown: attempt 0 means "the latest", for a task that has not started yet.
const logView = { taskId: null, attempt: 0, controller: null, following: false, failed: false };

async function refreshTask(taskId) {
  let task;
  try {
    task = await api(`/api/v1/tasks/${encodeURIComponent(taskId)}`);
    if (task.node_id && !nodeNames.has(task.node_id)) await refreshNodeNames();
    showBanner(null);
  } catch (error) {
    showBanner(error.status === 404 ? `No task ${taskId}.` : `Cannot read task: ${error.message}`);
    return;
  }
  if (currentTaskId() !== taskId) return;
  renderTask(task);
  const pinned = $("attempt-select").dataset.pinned === "1";
  if (logView.taskId !== taskId) {
    startLog(task, task.attempt);
  } else if (!logView.following && !pinned &&
             (task.attempt > logView.attempt || (logView.failed && cancelable(task)))) {
    // The task was requeued and runs again, or the stream broke while it still runs.
    startLog(task, task.attempt);
  } else if (logView.following) {
    setLogStatus(task.state === "PENDING" ? "waiting to start" : "following", "live");
  }
}

function renderTask(task) {
  $("task-title").textContent = task.name || commandText(task);
  $("task-id").textContent = task.id;
  const badge = stateBadge(task);
  $("task-state").replaceWith(badge);
  badge.id = "task-state";

  const cancel = $("task-cancel");
  if (mayCancel(task)) {
    if (cancel.hidden || cancel.dataset.task !== task.id) {
      cancel.dataset.task = task.id;
      cancelButton(cancel, taskCancelUrl(task.id), () => refreshTask(task.id));
    }
    cancel.hidden = false;
  } else {
    cancel.hidden = true;
  }

  const finished = task.state === "COMPLETE" || task.state === "CANCELED";
  const end = task.finished_at ? Date.parse(task.finished_at) : Date.now();
  const ran = task.started_at ? formatDuration((end - Date.parse(task.started_at)) / 1000) : "–";
  const fields = [
    ["State", finished ? `${task.state} — ${longOutcome(task)}` : task.state],
    ["Exit code", task.exit_code ?? "–"],
    ["Attempt", task.attempt],
    ["Command", commandText(task), "wide mono"],
    ["CPU", `${formatCpu(task.cpu)} cores`],
    ["Memory", formatSize(task.memory_bytes)],
    ["Restart", task.restart ? "yes, if its node dies" : "no"],
    ["Node", task.node_id ? `${nodeLabel(task.node_id)} · ${task.node_id}${task.node_address ? ` at ${task.node_address}` : ""}` : "–", "wide mono"],
    ["Submitted", task.submitted_at ? `${task.submitted_at} (${ago(task.submitted_at)})` : "–"],
    ["Started", task.started_at || "–"],
    ["Finished", task.finished_at || "–"],
    [task.finished_at ? "Ran for" : "Running for", ran],
  ];
  fields.push(...batchFields(task));
  if ((task.constraints || []).length) fields.push(["Constraints", task.constraints.join(" && "), "wide mono"]);
  // Why it waits: its place in the queue (capped) beside the message that says why.
  if (task.ahead !== null && task.ahead !== undefined) fields.push(["Queue", `${task.ahead.toLocaleString()}${task.ahead_capped ? "+" : ""} ahead`]);
  if (task.message) fields.push([task.state === "PENDING" ? "Why it waits" : "Message", task.message, "wide"]);
  $("task-fields").replaceChildren(...fields.map(([label, value, extra]) => {
    const wide = extra && extra.includes("wide");
    const mono = extra && extra.includes("mono");
    // Elements (links) go in as they are; everything else as text, never as HTML.
    const dd = value instanceof Node ? el("dd", {}, value) : el("dd", { class: mono ? "mono" : "", text: String(value) });
    return el("div", { class: wide ? "wide" : "", "data-field": label }, el("dt", { text: label }), dd);
  }));
  renderAttempts(task);

  const select = $("attempt-select");
  $("attempt-label").hidden = task.attempt < 2;
  if (select.options.length !== task.attempt) {
    const chosen = select.value;
    select.replaceChildren(...Array.from({ length: task.attempt }, (_, index) =>
      el("option", { value: String(index + 1), text: String(index + 1) })));
    select.value = chosen && select.dataset.pinned === "1" ? chosen : String(task.attempt);
  }
}

function setLogStatus(text, kind = "") {
  const status = $("log-status");
  status.textContent = text;
  status.className = `log-status ${kind}`;
}

function stopLog() {
  if (logView.controller) logView.controller.abort();
  logView.controller = null;
  logView.following = false;
}

// Stream the log with follow=1 and append the text as it arrives.
async function startLog(task, attempt) {
  stopLog();
  const controller = new AbortController();
  Object.assign(logView, { taskId: task.id, attempt, controller, following: true, failed: false });
  const pre = $("task-log");
  if (task.redacted) {
    // Another user's log: the daemon would refuse it (403); say so instead of asking.
    Object.assign(logView, { following: false, attempt: attempt || 1 });
    pre.replaceChildren(el("span", { class: "placeholder", text: `Log ${HIDDEN_COMMAND}.` }));
    setLogStatus("");
    return;
  }
  const waiting = task.state === "PENDING" ? "Waiting for the task to start…" : "No output yet.";
  pre.replaceChildren(el("span", { class: "placeholder", text: waiting }));
  setLogStatus(task.state === "PENDING" ? "waiting to start" : "following", "live");
  let received = false;
  try {
    const params = new URLSearchParams({ follow: "1" });
    if (attempt) params.set("attempt", String(attempt));
    const response = await fetch(`/api/v1/tasks/${encodeURIComponent(task.id)}/logs?${params}`,
      { credentials: "same-origin", signal: controller.signal });
    if (response.status === 401) toSignIn();
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error || message; } catch (_) { /* keep it */ }
      throw new Error(message);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    setLogStatus("following", "live");
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const text = decoder.decode(value, { stream: true });
      if (!text) continue;
      if (!received) pre.replaceChildren();
      received = true;
      appendLog(pre, text);
    }
    const rest = decoder.decode();
    if (rest) appendLog(pre, rest);
    if (!received) pre.replaceChildren(el("span", { class: "placeholder", text: "The task printed nothing." }));
    if (logView.controller === controller) setLogStatus("end of log");
  } catch (error) {
    if (controller.signal.aborted) return;
    logView.failed = true;
    setLogStatus(error.message, "error");
  } finally {
    if (logView.controller === controller) {
      logView.following = false;
      // "Latest" of a task that had not started resolves to its first attempt.
      if (logView.attempt === 0) logView.attempt = 1;
    }
  }
}

function appendLog(pre, text) {
  // Keep following the bottom unless the reader scrolled up to read.
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 24;
  pre.append(text);
  if (pre.textContent.length > LOG_KEEP_CHARS) {
    pre.textContent = pre.textContent.slice(-LOG_KEEP_CHARS);
  }
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

function currentTaskId() {
  const match = location.hash.match(/^#\/tasks\/([^/]+)$/);
  return match ? decodeURIComponent(match[1]) : null;
}

// -- nodes ----------------------------------------------------------------------------------

async function refreshNodes() {
  try {
    const { nodes } = await api("/api/v1/nodes");
    showBanner(null);
    renderNodes(nodes);
    setUpdated("nodes-updated");
  } catch (error) {
    showBanner(`Cannot list nodes: ${error.message}`);
  }
}

function meter(label, used, total, format, unit) {
  const share = total > 0 ? used / total : 0;
  const fill = el("div", { class: `fill${share >= 0.95 ? " full" : share >= 0.75 ? " high" : ""}` });
  fill.style.width = `${Math.min(100, share * 100).toFixed(1)}%`;
  return el("div", { class: "meter" },
    el("div", { class: "meter-label" },
      el("span", { class: "what", text: label }),
      el("span", { class: "amount", text: `${format(used)} / ${format(total)}${unit} · ${Math.round(share * 100)}%` })),
    el("div", { class: "bar", role: "meter", "aria-valuenow": String(used), "aria-valuemax": String(total) }, fill));
}

function labelsLine(node) {
  const pairs = [...Object.entries(node.labels || {}).map(([key, value]) => `${key}=${value}`),
    ...Object.entries(node.taints || {}).map(([key, value]) => `taint ${key}=${value}`)];
  return pairs.length ? el("div", { class: "node-meta mono", text: pairs.join(" · ") }) : null;
}

function renderNodes(nodes) {
  nodes.sort((a, b) => (a.name || a.id).localeCompare(b.name || b.id));
  const sum = (key) => nodes.reduce((total, node) => total + node[key], 0);
  $("nodes-count").textContent = nodes.length;
  $("nodes-cpu").textContent = `${formatCpu(sum("cpu_allocated"))} / ${formatCpu(sum("cpu_capacity"))} cores`;
  $("nodes-memory").textContent = `${formatSize(sum("memory_allocated_bytes"))} / ${formatSize(sum("memory_capacity_bytes"))}`;
  $("nodes-running").textContent = sum("running");
  $("nodes-empty").hidden = nodes.length > 0;
  $("nodes-grid").replaceChildren(...nodes.map((node) => el("div",
    { class: `card node${node.etcd_leader ? " leader" : ""}`, "data-node": node.name },
    el("div", { class: "node-head" },
      el("h3", { text: node.name || shortId(node.id) }),
      node.etcd_leader ? el("span", { class: "badge leader", text: "etcd leader", title: "This node's etcd member leads the cluster" }) : null,
      node.nospace ? el("span", { class: "badge nospace", text: "NOSPACE", title: "etcd is out of space: nothing new is accepted" }) : null,
      node.start_backoff ? el("span", { class: "badge nospace", text: "START BACK-OFF", title: `steals nothing until ${node.start_backoff_until}: ${node.start_failure}` }) : null,
      node.cordoned ? el("span", { class: "badge nospace", text: node.draining ? "draining" : "cordoned",
        title: node.draining ? `Draining: steals nothing new; what still runs at ${node.drain_deadline} is handed back`
          : "Cordoned: steals nothing new; running tasks go on (filch node uncordon)" }) : null),
    el("div", { class: "node-meta mono", text: `${node.address} · ${shortId(node.id)}` }),
    labelsLine(node),
    meter("CPU", node.cpu_allocated, node.cpu_capacity, formatCpu, " cores"),
    meter("Memory", node.memory_allocated_bytes, node.memory_capacity_bytes, formatSize, ""),
    // Disk is counted only where /work sizes are enforced; elsewhere the size is advisory.
    (node.capabilities || {})["filch.io/disk-enforced"] === "true"
      ? meter("Disk", node.disk_allocated_bytes, node.disk_capacity_bytes, formatSize, "")
      : el("div", { class: "node-meta", text: "disk: advisory (sizes not enforced here)" }),
    el("div", { class: "node-foot" },
      el("span", {}, el("b", { text: String(node.running) }), " running"),
      el("span", {}, "executor ", el("b", { text: node.executor || "–" }))))));
}

// -- readiness ------------------------------------------------------------------------------

async function refreshReadiness() {
  const pill = $("readiness");
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    const failed = body.checks.filter((check) => !check.ok);
    pill.className = `readiness ${body.ready ? "ok" : "bad"}`;
    $("readiness-text").textContent = body.ready ? `ready · ${location.host}` : `not ready: ${failed.map((c) => c.name).join(", ")}`;
    pill.title = body.checks.map((check) => `${check.ok ? "✓" : "✗"} ${check.name}: ${check.detail}`).join("\n");
  } catch (error) {
    pill.className = "readiness bad";
    $("readiness-text").textContent = "unreachable";
    pill.title = String(error);
  }
}

// -- routing --------------------------------------------------------------------------------

function route() {
  const taskId = currentTaskId();
  const view = taskId ? "task" : location.hash === "#/nodes" ? "nodes" : "tasks";
  const arrayMatch = location.hash.match(/^#\/arrays\/([^/]+)$/);
  const array = arrayMatch ? decodeURIComponent(arrayMatch[1]) : null;
  if (array !== arrayFilter) {
    arrayFilter = array;
    lastTasks = [];
    $("tasks-body").replaceChildren();
    // Another array's button and count: the next list draws this one's.
    $("array-cancel").hidden = true;
    $("array-cancel-result").textContent = "";
  }
  $("array-filter").hidden = !arrayFilter;
  $("array-filter-id").textContent = arrayFilter || "";
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== `view-${view}`;
  }
  for (const tab of document.querySelectorAll(".tabs a")) {
    tab.classList.toggle("active", tab.dataset.view === (view === "task" ? "tasks" : view));
  }
  if (view !== "task") {
    stopLog();
    logView.taskId = null;
  }
  showBanner(null);
  if (view === "tasks") {
    document.title = arrayFilter ? `Array ${shortTaskId(arrayFilter)} · filch` : "Tasks · filch";
    poll(refreshTasks, tasksEvery);
  } else if (view === "nodes") {
    document.title = "Nodes · filch";
    poll(refreshNodes, NODES_EVERY_MS);
  } else {
    document.title = `Task ${shortTaskId(taskId)} · filch`;
    if (logView.taskId !== taskId) {
      stopLog();
      logView.taskId = null;
      $("task-title").textContent = "";
      $("task-fields").replaceChildren();
      $("task-log").replaceChildren();
      $("task-cancel").hidden = true;
      $("attempt-select").replaceChildren();
      $("attempts-card").hidden = true;
      delete $("attempt-select").dataset.pinned;
    }
    poll(() => refreshTask(taskId), TASK_EVERY_MS);
  }
}

function start() {
  for (const button of $("state-filter").querySelectorAll("button")) {
    button.addEventListener("click", () => setStateFilter(button.dataset.state));
  }
  setStateFilter("");
  $("auto-refresh").addEventListener("change", () => { if ($("auto-refresh").checked) refreshTasks(); });
  $("attempt-select").addEventListener("change", async () => {
    const select = $("attempt-select");
    select.dataset.pinned = "1";
    const task = await api(`/api/v1/tasks/${encodeURIComponent(currentTaskId())}`);
    startLog(task, Number(select.value));
  });
  loadWhoAmI();
  $("sign-out").addEventListener("click", async () => {
    try { await api("/logout", { method: "POST", body: "{}" }); } catch (_) { /* signed out anyway */ }
    toSignIn();
  });
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) route(); });
  if (!location.hash) history.replaceState(null, "", "#/tasks");
  route();
  startEvents();
  refreshReadiness();
  setInterval(() => { if (!document.hidden) refreshReadiness(); }, READY_EVERY_MS);
}

start();
