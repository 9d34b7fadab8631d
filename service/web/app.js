// The page's wiring: load the concepts (and the policy when the server has one), submit the
// unedited + edited pair as one batch with the same seed, poll both jobs, cancel, show API
// errors next to the field at fault, keep this tab's history, ask for an API key on 401.

import { api, ApiError, apiKey, optional } from "./api.js";
import { conceptField, describeEdits, readEdits, renderConcepts } from "./concepts.js";
import { loadHistory, renderHistory, saveHistory } from "./history.js";
import { JobPanel, TERMINAL } from "./panel.js";
import { lockedConcepts, policyNote } from "./policy.js";

const POLL_MS = 500;
const TRANSIENT = new Set([0, 429, 502, 503, 504]);
const FIELD_IDS = {
  prompt: "prompt", negative_prompt: "negative-prompt", seed: "seed", steps: "steps",
};
// A 422 says "field: message; field: message"; split it there, not at a "; " inside a message.
const FIELDS = ["prompt", "negative_prompt", "concepts", "seed", "steps", "guidance", "width",
  "height", "n_images", "scheduler", "webhook", "requests", "body"];
const PART_SPLIT = new RegExp(`; (?=(?:requests\\[\\d+\\]\\.)?(?:${FIELDS.join("|")})\\b[^:;]*: )`);
const PART = /^(?:requests\[(\d+)\]\.)?([^:]+): ([\s\S]*)$/;

const $ = (id) => document.getElementById(id);
const state = { policy: null, run: null, history: loadHistory() };
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// -- API key -----------------------------------------------------------------------------

function needsKey(err) {
  if (!(err instanceof ApiError) || err.status !== 401) return false;
  $("auth").hidden = false;
  $("auth-message").textContent = `${err.message}. The key stays in this browser tab only.`;
  $("api-key").focus();
  return true;
}

$("auth-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  apiKey.set(key);
  $("auth").hidden = true;
  loadBundle();
});

// -- concepts and policy -----------------------------------------------------------------

async function loadBundle() {
  try {
    const [list, policy] = await Promise.all([api("v1/concepts"), optional("v1/policy")]);
    state.policy = policy;
    renderConcepts($("concepts"), list.concepts, lockedConcepts(policy));
    const note = policyNote(policy);
    $("policy-note").hidden = !note;
    $("policy-note").replaceChildren(...(note ?? []));
  } catch (err) {
    if (!needsKey(err)) showFormError(`Could not load the concepts: ${err.message}`);
  }
}

// -- errors ------------------------------------------------------------------------------

function showFormError(message) {
  $("form-error").textContent = message;
  $("form-error").hidden = false;
}

function clearErrors() {
  $("form-error").hidden = true;
  document.querySelectorAll(".field-error").forEach((p) => {
    p.hidden = true;
    p.textContent = "";
  });
  document.querySelectorAll("[aria-invalid]").forEach((c) => c.removeAttribute("aria-invalid"));
}

// Where a field path's message goes: {control, message} or null (then: the form's error).
function fieldTarget(path, request) {
  if (FIELD_IDS[path]) {
    const id = FIELD_IDS[path];
    return { control: $(id), message: $(`${id}-error`) };
  }
  const concept = /^concepts\[(\d+)\](?:\.(\w+))?$/.exec(path);
  const edit = concept && request?.concepts?.[Number(concept[1])];
  return edit ? conceptField($("concepts"), edit.name, concept[2] ?? "name") : null;
}

function showApiError(err, requests) {
  if (needsKey(err)) return;
  const parts = err.status === 422 ? err.message.split(PART_SPLIT) : [err.message];
  let first = null;
  parts.forEach((part) => {
    const match = PART.exec(part);
    const target = match && fieldTarget(match[2], requests[Number(match[1] ?? 0)]);
    if (!target) {
      const wait = err.retryAfter ? ` (retry in ${err.retryAfter} s)` : "";
      showFormError(`${part}${wait}`);
      return;
    }
    const lines = new Set(target.message.textContent ? target.message.textContent.split("\n") : []);
    lines.add(match[3]);
    target.message.textContent = [...lines].join("\n");
    target.message.hidden = false;
    target.control.setAttribute("aria-invalid", "true");
    first ??= target.control;
  });
  first?.focus();
}

// Editing a field clears its error (a concept's row clears as a whole).
function clearFieldError(event) {
  const row = event.target.closest("fieldset.concept");
  const controls = row ? [...row.querySelectorAll("[aria-invalid]")] : [event.target];
  const messages = row ? [...row.querySelectorAll(".field-error")]
    : (event.target.getAttribute("aria-describedby") ?? "").split(" ").map((id) => $(id))
      .filter((p) => p?.classList.contains("field-error"));
  controls.forEach((c) => c.removeAttribute("aria-invalid"));
  messages.forEach((p) => { p.hidden = true; p.textContent = ""; });
}

// -- runs: two jobs, polled --------------------------------------------------------------

function number(input) {
  const text = input.value.trim();
  return text === "" ? null : Number(text);
}

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

function showHistory() {
  $("history-empty").hidden = state.history.length > 0;
  $("clear-history").hidden = state.history.length === 0;
  renderHistory($("history-list"), state.history, state.run?.entry.id, openRun);
}

// Add a run to the history, or update it where it is.
function remember(entry) {
  const at = state.history.findIndex((e) => e.id === entry.id);
  if (at < 0) state.history.unshift(entry);
  else state.history[at] = entry;
  saveHistory(state.history);
  showHistory();
}

function updateCancel() {
  $("cancel").disabled = !state.run?.jobs.some((job) => job.id && !job.done);
}

// Show a job's latest view; true when its history record changed (status or image).
function apply(job, view) {
  const before = `${job.record.status} ${job.record.thumb}`;
  job.view = view;
  job.done = TERMINAL.has(view.status);
  job.record.status = view.status;
  job.record.thumb = view.images?.[0]?.url ?? job.record.thumb;
  job.panel.update(view, job.label);
  return before !== `${job.record.status} ${job.record.thumb}`;
}

async function poll(job) {
  try {
    return apply(job, await api(`v1/generations/${encodeURIComponent(job.id)}`));
  } catch (err) {
    if (TRANSIENT.has(err.status)) {
      job.panel.say(`Waiting for the server: ${err.message}`);
      return false;
    }
    job.done = true;
    job.record.status = err.status === 404 ? "expired" : "failed";
    if (!needsKey(err)) job.panel.showError(err.message);
    else job.panel.showError("An API key is needed to follow this job.");
    return true;
  }
}

async function watch(run) {
  while (state.run === run) {
    const pending = run.jobs.filter((job) => job.id && !job.done);
    if (!pending.length) break;
    const changed = await Promise.all(pending.map(poll));
    if (state.run !== run) break;
    if (changed.some(Boolean)) remember(run.entry);
    updateCancel();
    if (run.jobs.some((job) => job.id && !job.done)) await sleep(POLL_MS);
  }
  updateCancel();
}

function openRun(entry) {
  const template = $("panel-template");
  const jobs = entry.jobs.map((record) => {
    const title = record.label === "edited" ? "Edited" : "Unedited";
    const panel = record.id ? new JobPanel(template, title, record.note)
      : JobPanel.idle(template, title, record.note);
    return { id: record.id, label: record.label, record, panel, done: !record.id };
  });
  state.run = { entry, jobs };
  $("results-empty").hidden = true;
  $("panels").replaceChildren(...jobs.map((job) => job.panel.root));
  showHistory();
  updateCancel();
  watch(state.run);
}

function uneditedNote() {
  return lockedConcepts(state.policy).size
    ? "Without your edits (the content policy's suppressions still apply)"
    : "Without your edits";
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  if ($("seed").value.trim() === "") $("seed").value = String(randomSeed());
  const common = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value.trim() || null,
    seed: number($("seed")),
    steps: number($("steps")),
  };
  const edits = readEdits($("concepts"));
  const requests = [{ ...common, concepts: [] }];
  if (edits.length) requests.push({ ...common, concepts: edits });
  $("generate").disabled = true;
  try {
    const batch = await api("v1/batches", { method: "POST", body: { requests } });
    const [unedited, edited] = batch.generations;
    openRun({
      id: batch.id,
      created: new Date().toISOString(),
      prompt: common.prompt,
      seed: unedited.seeds[0] ?? common.seed,
      edits: describeEdits(edits),
      jobs: [
        { label: "unedited", id: unedited.id, note: uneditedNote(), status: unedited.status },
        edited
          ? { label: "edited", id: edited.id, note: `Your edits: ${describeEdits(edits)}`,
            status: edited.status }
          : { label: "edited", id: null, note: "No concept edits chosen: choose Suppress or "
              + "Amplify for a concept to see its effect here." },
      ],
    });
    remember(state.run.entry);
    $("results").scrollIntoView({ block: "nearest" });
  } catch (err) {
    showApiError(err, requests);
  } finally {
    $("generate").disabled = false;
  }
}

async function cancelRun() {
  const run = state.run;
  const pending = run?.jobs.filter((job) => job.id && !job.done) ?? [];
  $("cancel").disabled = true;
  await Promise.all(pending.map(async (job) => {
    try {
      if (apply(job, await api(`v1/generations/${encodeURIComponent(job.id)}/cancel`,
        { method: "POST" }))) remember(run.entry);
    } catch (err) {
      if (!needsKey(err)) showFormError(`Could not cancel: ${err.message}`);
    }
  }));
  updateCancel();
}

// -- start -------------------------------------------------------------------------------

$("generate-form").addEventListener("submit", submit);
$("generate-form").addEventListener("input", clearFieldError);
$("cancel").addEventListener("click", cancelRun);
$("random-seed").addEventListener("click", () => { $("seed").value = String(randomSeed()); });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    $("generate-form").requestSubmit();
  }
});
$("clear-history").addEventListener("click", () => {
  state.history = [];
  saveHistory(state.history);
  showHistory();
});

showHistory();
loadBundle();
