// This tab's runs (sessionStorage): prompt, seed, edits, the job ids and a thumbnail per job.
// Image links are signed and expire, so opening an entry fetches its jobs again.

import { el } from "./dom.js";

const STORAGE = "steer.history";
const KEEP = 30;

export function loadHistory() {
  try {
    const entries = JSON.parse(sessionStorage.getItem(STORAGE) ?? "[]");
    return Array.isArray(entries) ? entries : [];
  } catch {
    return [];
  }
}

export function saveHistory(entries) {
  sessionStorage.setItem(STORAGE, JSON.stringify(entries.slice(0, KEEP)));
}

// "succeeded" when every job did, the common state otherwise, "running" while any is unfinished.
function runStatus(jobs) {
  const statuses = jobs.filter((j) => j.id).map((j) => j.status ?? "queued");
  if (statuses.some((s) => s === "queued" || s === "running")) {
    return statuses.includes("running") ? "running" : "queued";
  }
  return statuses.every((s) => s === statuses[0]) ? statuses[0] : "partial";
}

function thumbnail(job) {
  if (!job.thumb) return el("span", { class: "thumb empty", "aria-hidden": "true" });
  const img = el("img", { class: "thumb", src: job.thumb, alt: "" });
  img.addEventListener("error", () => img.replaceWith(
    el("span", { class: "thumb empty", "aria-hidden": "true" })));  // the link expired
  return img;
}

// Re-render the list; the entry that had the focus keeps it (polls re-render it).
export function renderHistory(list, entries, currentId, onOpen) {
  const focused = list.contains(document.activeElement) ? document.activeElement.dataset.entry
    : null;
  list.replaceChildren(...entries.map((entry) => {
    const status = runStatus(entry.jobs);
    const button = el("button", {
      type: "button", class: "history-item", "data-entry": entry.id,
      "aria-current": entry.id === currentId ? "true" : null, onclick: () => onOpen(entry),
    },
    el("span", { class: "thumbs" }, entry.jobs.map(thumbnail)),
    el("span", { class: "history-text" },
      el("span", { class: "history-prompt" }, entry.prompt),
      el("span", { class: "hint" }, `seed ${entry.seed} · ${entry.edits || "no edits"} · `,
        el("span", { class: `badge badge-${status}` }, status))));
    return el("li", {}, button);
  }));
  if (focused) {
    [...list.querySelectorAll("button")].find((b) => b.dataset.entry === focused)?.focus();
  }
}
