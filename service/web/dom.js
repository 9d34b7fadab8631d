// A tiny element builder: el("p", {class: "hint"}, "text", child…). Text is never parsed as
// HTML, so prompts and server messages cannot inject markup.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

// 0.42 → "0.42", 60 → "60": numbers as a person would write them.
export function formatNumber(value, digits = 2) {
  return Number.isFinite(value) ? String(Number(value.toFixed(digits))) : "–";
}
