// The concept controls: one fieldset per kind, one per concept (off / suppress / amplify,
// γ and percentile sliders). Concepts the content policy always suppresses are shown locked.

import { el, formatNumber } from "./dom.js";

const DIRECTIONS = [["off", "Off"], ["suppress", "Suppress"], ["amplify", "Amplify"]];

// A slider step of 1, 2 or 5 × 10^k giving about 200 positions over [lo, hi].
// About 200 positions, a round step, and the default on the grid (a range slider snaps its
// value to lo + k·step, so a default off the grid would be shown and sent as another γ).
function niceStep(lo, hi, value) {
  const raw = (hi - lo) / 200;
  const power = 10 ** Math.floor(Math.log10(raw));
  const steps = [1, 2, 5, 10, 20, 50, 100].map((m) => m * power).filter((s) => s >= raw);
  const onGrid = (s) => Math.abs((value - lo) / s - Math.round((value - lo) / s)) < 1e-6;
  return steps.find(onGrid) ?? steps[0];
}

function decimals(value) {
  const text = String(value);
  return text.includes(".") ? text.split(".")[1].length : 0;
}

// The bundle gives only a default percentile; the API accepts [0, 100). The slider spans
// [min(90, default), 100 - step] with the default's precision (at least 0.1).
function percentileRange(defaultPct) {
  const step = 10 ** -Math.max(1, decimals(defaultPct));
  const max = Number((100 - step).toFixed(decimals(step)));
  return { min: Math.min(90, Math.floor(defaultPct)), max, step };
}

function slider(id, label, range, value, describedBy) {
  const output = el("output", { for: id, id: `${id}-value` }, formatNumber(value, 3));
  const input = el("input", {
    id, type: "range", min: range.min, max: range.max, step: range.step, value,
    "aria-describedby": describedBy,
  });
  input.addEventListener("input", () => {
    output.textContent = formatNumber(Number(input.value), 3);
  });
  return el("div", { class: "slider" }, el("label", { for: id }, label, " ", output), input);
}

function lockedRow(concept, rule) {
  const gamma = rule.gamma ?? concept.default_gamma;
  const pct = rule.percentile ?? concept.default_percentile;
  return el("fieldset", { class: "concept locked", "data-concept": concept.name },
    el("legend", {}, concept.name),
    el("p", { class: "locked-note" },
      el("span", { class: "lock-badge" }, "Locked"), " ",
      `Always suppressed by the content policy (γ ${formatNumber(gamma, 3)}, `
      + `percentile ${formatNumber(pct, 3)}), in both images.`));
}

function conceptRow(concept, index) {
  const base = `concept-${index}`;
  const errorId = `${base}-error`;
  const sliders = el("div", { class: "sliders", hidden: true },
    slider(`${base}-gamma`, "γ", {
      min: concept.gamma_range[0], max: concept.gamma_range[1],
      step: niceStep(concept.gamma_range[0], concept.gamma_range[1], concept.default_gamma),
    }, concept.default_gamma, errorId),
    slider(`${base}-percentile`, "Percentile", percentileRange(concept.default_percentile),
      concept.default_percentile, errorId));
  const radios = DIRECTIONS.map(([value, label]) => el("label", { class: "choice" },
    el("input", {
      type: "radio", name: `${base}-direction`, value, checked: value === "off",
      "aria-describedby": errorId,
    }), label));
  const row = el("fieldset", { class: "concept", "data-concept": concept.name, id: base },
    el("legend", {}, concept.name),
    el("div", { class: "choices" }, radios),
    sliders,
    el("p", { class: "field-error", id: errorId, hidden: true }));
  row.addEventListener("change", (event) => {
    if (event.target.type !== "radio") return;
    sliders.hidden = event.target.value === "off";
    row.classList.toggle("active", !sliders.hidden);
  });
  return row;
}

function kindTitle(kind) {
  return kind.charAt(0).toUpperCase() + kind.slice(1);
}

// Fill `container` with the controls; `locked` maps concept name → {gamma, percentile}.
export function renderConcepts(container, concepts, locked = new Map()) {
  const kinds = new Map();
  concepts.forEach((concept) => {
    if (!kinds.has(concept.kind)) kinds.set(concept.kind, []);
    kinds.get(concept.kind).push(concept);
  });
  const groups = [...kinds].map(([kind, members]) => el("fieldset", { class: "kind" },
    el("legend", {}, kindTitle(kind)),
    members.map((concept) => (locked.has(concept.name)
      ? lockedRow(concept, locked.get(concept.name))
      : conceptRow(concept, concepts.indexOf(concept))))));
  container.replaceChildren(...(groups.length ? groups
    : [el("p", { class: "hint" }, "This server has no steering bundle: images are generated "
      + "without concept edits.")]));
  container.removeAttribute("aria-busy");
}

// The user's edits in request form, in page order: [{name, direction, gamma, percentile}].
export function readEdits(container) {
  return [...container.querySelectorAll("fieldset.concept:not(.locked)")].flatMap((row) => {
    const direction = row.querySelector("input[type=radio]:checked")?.value ?? "off";
    if (direction === "off") return [];
    return [{
      name: row.dataset.concept,
      direction,
      gamma: Number(row.querySelector(`#${row.id}-gamma`).value),
      percentile: Number(row.querySelector(`#${row.id}-percentile`).value),
    }];
  });
}

// The control a `concepts[i].<part>` error is about, and where to show its message.
export function conceptField(container, name, part) {
  const row = [...container.querySelectorAll("fieldset.concept")]
    .find((r) => r.dataset.concept === name);
  if (!row || row.classList.contains("locked")) return null;
  const control = row.querySelector(`#${row.id}-${part}`)
    ?? row.querySelector("input[type=radio]:checked");
  return { control, message: row.querySelector(".field-error") };
}

// A short text for an edit list: "−red γ60 p99, +blue γ20 p99".
export function describeEdits(edits) {
  return edits.map((e) => `${e.direction === "amplify" ? "+" : "−"}${e.name} `
    + `γ${formatNumber(e.gamma, 3)} p${formatNumber(e.percentile, 3)}`).join(", ");
}
