// One job's panel: status and queue position (announced politely), a progress bar, then the
// image with its detection scores, policy flags or the refusal, and a download link.

import { el, formatNumber } from "./dom.js";
import { policyBadge, policyItems, REFUSED } from "./policy.js";

export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const TOP_SCORES = 3;

function queueText(position) {
  if (position === null || position === undefined) return "Queued";
  if (position === 0) return "Queued: next in line";
  return `Queued: ${position} job${position === 1 ? "" : "s"} ahead`;
}

// What the live region says: changes of state, queue position and every quarter of progress
// (not every step, which a screen reader would read out one by one).
function announcement(view) {
  const { status, progress } = view;
  if (status === "queued") return queueText(view.queue_position);
  if (status === "running") {
    if (!progress?.total) return "Running";
    return `Running: ${Math.floor((4 * progress.step) / progress.total) * 25}% done`;
  }
  if (status === "succeeded") return "Done";
  if (status === "canceled") return "Canceled";
  if (view.error_code === REFUSED) return "Refused by the content policy";
  return "Failed";
}

export class JobPanel {
  constructor(template, title, note) {
    this.root = template.content.firstElementChild.cloneNode(true);
    this.q = (selector) => this.root.querySelector(selector);
    this.q(".panel-title").textContent = title;
    this.q(".panel-note").textContent = note;
    this.root.dataset.role = title.toLowerCase();
    this.q(".bar").setAttribute("aria-label", `${title}: progress`);
    this.spoken = "";
  }

  // A panel with no job (e.g. no edits chosen): a note and nothing to wait for.
  static idle(template, title, note) {
    const panel = new JobPanel(template, title, note);
    panel.q(".progress-row").hidden = true;
    panel.root.classList.add("idle");
    return panel;
  }

  say(text) {
    if (text !== this.spoken) this.q(".status").textContent = text;
    this.spoken = text;
  }

  showError(message) {
    this.root.dataset.status = "error";
    this.q(".progress-row").hidden = true;
    this.say(message);
    this.root.classList.add("failed");
  }

  update(view, label) {
    this.root.dataset.status = view.status;
    const bar = this.q(".bar");
    const { progress } = view;
    if (view.status === "queued" || !progress?.total) {
      bar.removeAttribute("value");            // indeterminate while queued
      this.q(".step").textContent = view.status === "queued" ? queueText(view.queue_position) : "";
    } else {
      bar.max = progress.total;
      bar.value = progress.step;
      this.q(".step").textContent = `step ${progress.step} of ${progress.total}`;
    }
    if (TERMINAL.has(view.status)) {
      this.q(".progress-row").hidden = view.status !== "succeeded";
      if (view.status === "succeeded") bar.value = bar.max;
    }
    let text = announcement(view);
    // A refusal's reasons are in the policy checks below; other failures say why here.
    if (view.status === "failed" && view.error && view.error_code !== REFUSED) {
      text += `: ${view.error}`;
    }
    this.say(text);
    this.root.classList.toggle("failed", view.status === "failed");
    this.root.classList.toggle("refused", view.error_code === REFUSED);
    if (view.status === "succeeded") this.showResult(view, label);
    if (TERMINAL.has(view.status)) this.showPolicy(view);
  }

  showPolicy(view) {
    const items = policyItems(view);
    this.q(".flags").replaceChildren(...items);
    this.q(".flags").hidden = !items.length;
    const badge = policyBadge(view);
    this.q(".policy-badge").textContent = badge ?? "";
    this.q(".policy-badge").hidden = !badge;
  }

  showResult(view, label) {
    const image = view.images?.[0];
    const figure = this.q(".image");
    if (image && figure.hidden) {
      const img = this.q("img");
      img.src = image.url;
      img.alt = `${label} image, seed ${image.seed}`;
      this.q("figcaption").textContent = `seed ${image.seed}`;
      figure.hidden = false;
      const link = this.q(".download");
      link.href = image.url;
      link.download = `sae-steering-${image.seed}-${label}.png`;
      link.hidden = false;
      link.setAttribute("aria-label", `Download the ${label} image (PNG)`);
    }
    this.showScores(view.detection_after?.[0] ?? view.detection?.[0] ?? {},
                    view.detection_after?.length ? view.detection?.[0] ?? {} : null);
  }

  // Scores of the returned image (read on the final activations when the bundle can) and,
  // when they differ in kind, the scores read before the edits beside them.
  showScores(scores, before) {
    const entries = Object.entries(scores).sort((a, b) => b[1] - a[1]);
    const details = this.q(".scores");
    details.hidden = !entries.length;
    if (!entries.length) return;
    this.q(".scores summary").textContent = `Detected: ${entries.slice(0, TOP_SCORES)
      .map(([name, score]) => `${name} ${formatNumber(score)}`).join(", ")}`;
    this.q(".scores th.before").hidden = !before;
    this.q(".scores tbody").replaceChildren(...entries.map(([name, score]) => {
      const meter = el("span", { class: "meter", "aria-hidden": "true" });
      meter.style.setProperty("--score", Math.max(0, Math.min(1, score)));  // CSSOM: CSP-safe
      const cells = [el("th", { scope: "row" }, name), el("td", {}, meter, formatNumber(score))];
      if (before) cells.push(el("td", {}, formatNumber(before[name] ?? 0)));
      return el("tr", {}, ...cells);
    }));
  }
}
