// Errors on the page: an alert per panel, and messages next to the fields the server named.
import { Code } from "@connectrpc/connect";
import { $, el, show } from "./dom.js";
import type { FieldProblem, ServiceName, UiError } from "./errors.js";

const FIELD_LABELS: Record<string, string> = {
  image: "Image",
  prompt: "Prompt",
  negative_prompt: "Negative prompt",
  strength: "Strength",
  num_inference_steps: "Steps",
  guidance_scale: "Guidance",
  seed: "Seed",
  scheduler: "Sampler",
  output_format: "Format",
  preview_every_n_steps: "Preview interval",
  foreground_ratio: "Object size",
  mc_resolution: "Detail",
  mc_threshold: "Surface threshold",
  remove_background: "Background",
  bake_texture: "Texture baking",
  texture_resolution: "Texture size",
};

function fieldSentence(problem: FieldProblem): string {
  const label = FIELD_LABELS[problem.field] ?? problem.field;
  // The server phrases descriptions to follow the field name ("is 32x32; …").
  return /^(is|has|needs|must|should|was|cannot)\b/.test(problem.description)
    ? `${label} ${problem.description}`
    : `${label}: ${problem.description}`;
}

/** The field-error element and the control for a server field name in one panel, if any. */
function fieldTarget(scope: ServiceName, field: string): { message: HTMLElement; control?: HTMLElement } | undefined {
  const message = document.getElementById(scope === "mesh" && field === "image" ? "err-mesh-image" : `err-${field}`);
  if (!message) return undefined;
  const form = scope === "img2img" ? $("input-panel") : $("mesh-panel");
  if (!form.contains(message)) return undefined;
  const control =
    field === "image" ? (scope === "img2img" ? $("drop") : undefined) : form.querySelector<HTMLElement>(`[name="${field}"]`);
  return control ? { message, control } : { message };
}

export function clearFieldErrors(scope: ServiceName): void {
  const panel = scope === "img2img" ? $("input-panel") : $("mesh-panel");
  for (const message of panel.querySelectorAll<HTMLElement>(".field-error")) message.textContent = "";
  for (const control of panel.querySelectorAll<HTMLElement>("[aria-invalid]")) control.removeAttribute("aria-invalid");
}

export function showFieldError(scope: ServiceName, problem: FieldProblem): boolean {
  const target = fieldTarget(scope, problem.field);
  if (!target) return false;
  target.message.textContent = fieldSentence(problem);
  target.control?.setAttribute("aria-invalid", "true");
  const details = target.message.closest("details");
  if (details) details.open = true;
  return true;
}

const countdowns = new WeakMap<HTMLElement, number>();

export function hideAlert(box: HTMLElement): void {
  const timer = countdowns.get(box);
  if (timer) clearInterval(timer);
  box.replaceChildren();
  delete box.dataset.kind;
  delete box.dataset.code;
  show(box, false);
}

export function showAlert(box: HTMLElement, scope: ServiceName, ui: UiError, retry?: () => void): void {
  hideAlert(box);
  box.dataset.kind = ui.kind;
  box.dataset.code = ui.status;
  const unplaced = ui.fields.filter((problem) => !showFieldError(scope, problem));
  const body = el("div", "alert-body");
  body.append(el("strong", "alert-title", ui.title));
  // When every problem sits next to its field, the server's summary would only repeat them.
  const placedAll = ui.fields.length > 0 && unplaced.length === 0;
  if (ui.kind !== "cancelled" && ui.message && !placedAll) body.append(el("p", "alert-message", ui.message));
  if (unplaced.length) {
    const list = el("ul", "alert-fields");
    for (const problem of unplaced) list.append(el("li", "", fieldSentence(problem)));
    body.append(list);
  }
  body.append(el("p", "alert-hint", ui.hint));
  const actions = el("div", "alert-actions");
  if (retry && ui.kind !== "cancelled" && ui.code !== Code.InvalidArgument) {
    const button = el("button", "btn small", "Retry");
    button.type = "button";
    button.addEventListener("click", () => {
      hideAlert(box);
      retry();
    });
    actions.append(button);
    if (ui.retryAfterS !== undefined && ui.retryAfterS > 0) {
      let left = Math.ceil(ui.retryAfterS);
      button.textContent = `Retry in ${left} s`;
      const timer = window.setInterval(() => {
        left -= 1;
        button.textContent = left > 0 ? `Retry in ${left} s` : "Retry now";
        if (left <= 0) clearInterval(timer);
      }, 1000);
      countdowns.set(box, timer);
    }
  }
  const dismiss = el("button", "btn ghost small", "Dismiss");
  dismiss.type = "button";
  dismiss.addEventListener("click", () => hideAlert(box));
  actions.append(dismiss);
  if (ui.kind !== "cancelled") {
    const reason = ui.reason && ui.reason !== ui.status ? ` · ${ui.reason}` : "";
    actions.append(el("span", "alert-code", ui.status + reason));
  }
  box.append(body, actions);
  show(box);
  const firstInvalid = (scope === "img2img" ? $("input-panel") : $("mesh-panel")).querySelector<HTMLElement>("[aria-invalid]");
  firstInvalid?.focus({ preventScroll: false });
}
