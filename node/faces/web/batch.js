// filch web UI, batch work: what a task's JSON says about its array, dependencies, hold,
// time limit, retries, priority, owner and attempts, as page elements, and the array
// page's cancel button. Loaded before app.js, whose helpers (el, shortId, shortTaskId,
// nodeLabel, cancelable, cancelButton) these functions call.
// Everything a user typed (names, owners, messages) goes in as text, never as HTML.
"use strict";

// Durations spelled as the CLI reads and prints them (node/units.py format_seconds):
// 90 -> 1m30s, 2.5 -> 2.5s, 7200 -> 2h.
function formatSeconds(seconds) {
  if (seconds !== Math.floor(seconds) || seconds < 60) return `${seconds}s`;
  let whole = seconds;
  let out = "";
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]]) {
    const count = Math.floor(whole / size);
    whole -= count * size;
    if (count) out += `${count}${unit}`;
  }
  return out;
}

function taskLink(id) {
  return el("a", { href: `#/tasks/${encodeURIComponent(id)}`, class: "mono", text: shortTaskId(id), title: id });
}

function arrayLink(arrayId) {
  return el("a", { href: `#/arrays/${encodeURIComponent(arrayId)}`, class: "mono", text: arrayId,
    title: "this array's tasks" });
}

// The array page's "Cancel array" button: shown while the array has an unfinished task
// (or the list was cut short, so one may exist unread), left alone while it waits for
// its second click.
function renderArrayCancel(arrayId, tasks, truncated) {
  const button = $("array-cancel");
  if (!arrayId || !(truncated || tasks.some(cancelable))) {
    button.hidden = true;
    return;
  }
  if (button.hidden || button.dataset.array !== arrayId) armArrayCancel(button, arrayId);
  button.hidden = false;
}

function armArrayCancel(button, arrayId) {
  button.dataset.array = arrayId;
  cancelButton(button, arrayCancelUrl(arrayId), (reply) => {
    // Ready for another try (after a failure, or for tasks that were still being written).
    armArrayCancel(button, arrayId);
    // A failure stays in the banner: refreshing now would clear it.
    if (!reply) return;
    const count = Number(reply.canceled) || 0;
    $("array-cancel-result").textContent = `${count} task${count === 1 ? "" : "s"} canceled`;
    refreshTasks();
  });
}

// What a dependency kind means, as the submit flags say it.
const DEPENDENCY_KINDS = {
  success: "ended with exit code 0 (--after)",
  any: "ended, however (--after-any)",
  array: "every task ended with exit code 0 (--after-array)",
};

function dependencyList(after) {
  return el("ul", { class: "deps" }, ...after.map((parent) => el("li", { "data-parent": parent.id },
    parent.kind === "array" ? arrayLink(parent.id) : taskLink(parent.id),
    " ",
    el("span", { class: `kind ${parent.kind}`, text: parent.kind, title: DEPENDENCY_KINDS[parent.kind] || "" }))));
}

// The task detail's batch fields: [label, value (text or element), extra classes].
function batchFields(task) {
  const fields = [
    ["Owner", task.owner || "default"],
    ["Priority", String(task.priority ?? 0)],
  ];
  if (task.array_id) {
    fields.push(["Array", el("span", {}, arrayLink(task.array_id), ` · index ${task.array_index}`), "wide"]);
  }
  if (task.after && task.after.length) fields.push(["After", dependencyList(task.after), "wide"]);
  if (task.hold) {
    const until = task.not_before ? ` until ${task.not_before}` : "";
    fields.push(["Held", `${task.hold.toLowerCase()}${until}`]);
  }
  if (task.time_limit_seconds) fields.push(["Time limit", formatSeconds(task.time_limit_seconds)]);
  if (task.retries) {
    fields.push(["Retries", `${task.retries_used} of ${task.retries} used · on ${task.retry_on.join(", ")}` +
      ` · back-off from ${formatSeconds(task.retry_backoff_seconds)}`, "wide"]);
  }
  return fields;
}

// The attempt history: every ended attempt, then the running one (no finished_at).
function renderAttempts(task) {
  const attempts = task.attempts || [];
  const card = $("attempts-card");
  // One attempt that is still running says nothing the fields above do not.
  card.hidden = !(attempts.length > 1 || (attempts.length === 1 && attempts[0].finished_at));
  $("attempts-body").replaceChildren(...attempts.map((attempt) => el("tr", { "data-attempt": String(attempt.attempt) },
    el("td", { class: "num", text: String(attempt.attempt) }),
    el("td", { text: attempt.node_name || nodeLabel(attempt.node_id), title: attempt.node_id || "" }),
    el("td", { text: attempt.started_at || "–" }),
    el("td", { text: attempt.finished_at || "running" }),
    el("td", { class: "num", text: attempt.exit_code ?? "–" }),
    el("td", { text: attempt.reason || "–" }),
    el("td", { class: "message", text: attempt.message || "–", title: attempt.message || "" }))));
}

// The task list's priority and owner cells.
function batchCells(task) {
  return [
    el("td", { class: "num", text: String(task.priority ?? 0) }),
    el("td", { class: "owner", text: task.owner || "default", title: task.owner || "" }),
  ];
}
