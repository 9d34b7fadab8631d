// The content-safety policy as the page shows it: GET /v1/policy (the caller's effective
// policy; `name` null when the deployment has none, and a server from before policies
// answers 404: both show nothing), and a generation's `policy` report (per image, every
// detection rule's score, threshold, action taken and why).

import { el, formatNumber } from "./dom.js";

export const REFUSED = "content_policy_violation";

// Concept name → {gamma, percentile} of the policy's always-on suppressions.
export function lockedConcepts(policy) {
  return new Map((policy?.suppress ?? []).map((edit) => [edit.concept, edit]));
}

// The note above the concept controls: which policy applies and what it does.
export function policyNote(policy) {
  if (!policy?.name) return null;
  const locked = [...lockedConcepts(policy).keys()];
  const rules = (policy.detect ?? []).map((rule) => `${rule.concept} `
    + `(${rule.action} at score ≥ ${formatNumber(rule.threshold, 3)})`);
  return [
    el("h2", {}, `Content policy: ${policy.name}`,
      policy.source === "api_key" ? " (your API key's own)" : ""),
    policy.description ? el("p", {}, policy.description) : null,
    el("p", {}, locked.length ? `Always suppressed, in both images: ${locked.join(", ")}.`
      : "No concept is always suppressed."),
    el("p", {}, rules.length ? `Checked on every image: ${rules.join(", ")}.`
      : "No detection rules."),
  ];
}

// The policy's lines for image `index` of a generation: edits it replaced, then every check
// ("cross: mark — score 0.912 ≥ threshold 0.5: image returned, flagged").
export function policyItems(generation, index = 0) {
  const report = generation?.policy;
  if (!report) return [];
  const replaced = (report.replaced ?? []).map((edit) => el("li", { class: "flag flag-replaced" },
    el("strong", {}, edit.concept), ": your edit was replaced by the policy's suppression"));
  const checks = (report.images?.[index]?.checks ?? []).map((check) => el("li", {
    class: `flag flag-${check.action}`,
  }, el("strong", {}, check.concept), `: ${check.action === "none" ? "ok" : check.action} — `,
  check.reason));
  return [...replaced, ...checks];
}

// "Flagged", "Steered" or null: what the policy did to image `index`.
export function policyBadge(generation, index = 0) {
  const image = generation?.policy?.images?.[index];
  if (image?.steered) return "Steered by the policy";
  if (image?.flagged) return "Flagged by the policy";
  return null;
}
