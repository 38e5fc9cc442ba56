// Kiln's page: pick an image, generate a new one with live progress and previews, turn either
// into a mesh and look at it in 3D. All calls are gRPC-Web to the gateway serving this page.
import type { DescEnum } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { img2img, mesh } from "./api.js";
import { describeError, type FieldProblem, type ServiceName, type UiError } from "./errors.js";
import {
  extensionFor,
  formatBytes,
  formatCount,
  formatSeconds,
  schedulerLabel,
  seconds,
  shortModelName,
} from "./format.js";
import { ArtifactDelivery } from "./gen/kiln/common/v1/artifact_pb.js";
import { Stage, type Progress } from "./gen/kiln/common/v1/job_pb.js";
import { Readiness, type ModelInfo, type ServerLimits } from "./gen/kiln/common/v1/service_info_pb.js";
import {
  ImageFormatSchema,
  SchedulerSchema,
  type GetInfoResponse as Img2ImgInfo,
  type Result as Img2ImgResult,
} from "./gen/kiln/img2img/v1/img2img_service_pb.js";
import {
  MeshFormat,
  MeshFrame,
  RemoveBackgroundSchema,
  type GetInfoResponse as MeshInfo,
  type Result as MeshResult,
} from "./gen/kiln/mesh/v1/mesh_service_pb.js";
import { runJob, StreamError, type ArtifactFile, type JobHandlers } from "./jobs.js";
import { MeshViewer } from "./viewer.js";

// ---------------------------------------------------------------------------------------------
// DOM helpers

function $<T extends HTMLElement = HTMLElement>(id: string): T {
  const element = document.getElementById(id);
  if (!element) throw new Error(`the page has no #${id}`);
  return element as T;
}

function show(element: HTMLElement, visible = true): void {
  element.hidden = !visible;
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, className?: string, text?: string): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function enumNumber(schema: DescEnum, name: string): number {
  const value = schema.values.find((v) => v.name === name);
  if (!value) throw new Error(`${schema.typeName} has no ${name}`);
  return value.number;
}

function downloadBlob(blob: Blob, name: string): void {
  const url = URL.createObjectURL(blob);
  const link = el("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30_000);
}

// ---------------------------------------------------------------------------------------------
// Test and debugging hooks: `window.kiln` (the browser tests read these; harmless otherwise)

interface LoggedEvent {
  job: ServiceName;
  kind: string;
  t: number;
}

const hooks = {
  /** Every stream event as it arrived (performance.now() times). */
  events: [] as LoggedEvent[],
  viewer: {
    meshCount: (): number => viewer.meshCount(),
    pixelStats: () => viewer.pixelStats(),
    webgl: (): boolean => viewer.webgl,
  },
  info: { img2img: undefined as Img2ImgInfo | undefined, mesh: undefined as MeshInfo | undefined },
};
declare global {
  interface Window {
    kiln: typeof hooks;
  }
}
window.kiln = hooks;

function logEvent(job: ServiceName, kind: string): void {
  hooks.events.push({ job, kind, t: performance.now() });
}

// ---------------------------------------------------------------------------------------------
// Errors: alerts per panel, messages next to the fields the server named

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

function clearFieldErrors(scope: ServiceName): void {
  const panel = scope === "img2img" ? $("input-panel") : $("mesh-panel");
  for (const message of panel.querySelectorAll<HTMLElement>(".field-error")) message.textContent = "";
  for (const control of panel.querySelectorAll<HTMLElement>("[aria-invalid]")) control.removeAttribute("aria-invalid");
}

function showFieldError(scope: ServiceName, problem: FieldProblem): boolean {
  const target = fieldTarget(scope, problem.field);
  if (!target) return false;
  target.message.textContent = fieldSentence(problem);
  target.control?.setAttribute("aria-invalid", "true");
  const details = target.message.closest("details");
  if (details) details.open = true;
  return true;
}

const countdowns = new WeakMap<HTMLElement, number>();

function hideAlert(box: HTMLElement): void {
  const timer = countdowns.get(box);
  if (timer) clearInterval(timer);
  box.replaceChildren();
  delete box.dataset.kind;
  delete box.dataset.code;
  show(box, false);
}

function showAlert(box: HTMLElement, scope: ServiceName, ui: UiError, retry?: () => void): void {
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

// ---------------------------------------------------------------------------------------------
// Progress bars

function setBar(bar: HTMLElement, fraction: number, text: string): void {
  const percent = Math.round(Math.min(1, Math.max(0, fraction)) * 100);
  bar.setAttribute("aria-valuenow", String(percent));
  bar.setAttribute("aria-valuetext", text);
  const fill = bar.firstElementChild as HTMLElement | null;
  if (fill) fill.style.width = `${percent}%`;
}

function etaText(eta: number | undefined): string {
  return eta === undefined ? "" : `about ${formatSeconds(eta)} left`;
}

function waitText(eta: number | undefined): string {
  return eta === undefined ? "" : `starts in about ${formatSeconds(eta)}`;
}

/** Screen readers hear phase changes (queued, denoising, done), not every step. */
function announce(region: string, text: string): void {
  const live = $(region);
  if (live.dataset.last !== text) {
    live.dataset.last = text;
    live.textContent = text;
  }
}

const IMG2IMG_STAGES: Partial<Record<Stage, string>> = {
  [Stage.PREPROCESS]: "Preparing the image",
  [Stage.DENOISE]: "Denoising",
  [Stage.DECODE]: "Decoding",
  [Stage.POSTPROCESS]: "Saving",
  [Stage.VENDOR_SUBMITTED]: "Sent to the vendor",
  [Stage.VENDOR_WAITING]: "Waiting for the vendor",
  [Stage.VENDOR_RECEIVED]: "Received from the vendor",
};

function stepText(progress: Progress): string {
  return progress.totalSteps > 0 ? ` · step ${progress.step} of ${progress.totalSteps}` : "";
}

// ---------------------------------------------------------------------------------------------
// Server status (GetInfo), and the parameter ranges it publishes

const status = { img2img: undefined as ServerLimits | undefined, mesh: undefined as ServerLimits | undefined };
let rangesApplied = { img2img: false, mesh: false };

function setStatus(service: ServiceName, model: ModelInfo | undefined, limits: ServerLimits | undefined, error?: UiError): void {
  const pill = $(`status-${service}`);
  const detail = pill.querySelector<HTMLElement>(".service-detail");
  const name = service === "img2img" ? "image server" : "3D server";
  if (!model || error) {
    pill.dataset.state = "down";
    if (detail) detail.textContent = "unreachable";
    pill.title = `The ${name} does not answer${error ? `: ${error.message}` : ""}`;
    return;
  }
  const states: Record<number, [string, string]> = {
    [Readiness.READY]: ["ready", "ready"],
    [Readiness.LOADING]: ["loading", "loading model…"],
    [Readiness.FAILED]: ["down", "failed to load"],
    [Readiness.DRAINING]: ["loading", "shutting down"],
  };
  const [state, label] = states[model.readiness] ?? ["unknown", "unknown"];
  pill.dataset.state = state;
  const load = limits && (limits.running || limits.queued) ? ` · ${limits.running} running, ${limits.queued} queued` : "";
  if (detail) detail.textContent = `${label} · ${model.device}${load}`;
  pill.title = [
    `${shortModelName(model.modelId)} (${model.provider}) on ${model.device}${model.dtype ? ` ${model.dtype}` : ""}`,
    model.readinessReason,
    limits ? `${limits.maxConcurrency} at once, ${limits.maxQueue} may wait` : "",
  ]
    .filter(Boolean)
    .join("\n");
}

function setRange(input: HTMLInputElement, range: { min: number | bigint; max: number | bigint; defaultValue: number | bigint } | undefined): void {
  if (!range) return;
  input.min = String(range.min);
  input.max = String(range.max);
  if (!input.dataset.touched) {
    input.value = String(range.defaultValue);
    input.dispatchEvent(new Event("input"));
  }
}

function applyImg2ImgRanges(info: Img2ImgInfo): void {
  const p = info.parameters;
  if (!p) return;
  const strength = $<HTMLInputElement>("strength");
  setRange(strength, p.strength);
  if (p.strength?.minExclusive) strength.min = String(Math.max(Number(strength.step), p.strength.min));
  setRange($<HTMLInputElement>("steps"), p.numInferenceSteps);
  setRange($<HTMLInputElement>("guidance"), p.guidanceScale);
  const every = $<HTMLInputElement>("preview-every");
  if (p.previewEveryNSteps) every.max = String(p.previewEveryNSteps.max);
  fillSelect($<HTMLSelectElement>("scheduler"), p.schedulers.map((n) => SchedulerSchema.values.find((v) => v.number === n)?.name ?? ""), schedulerLabel);
  fillSelect($<HTMLSelectElement>("format"), p.outputFormats.map((n) => ImageFormatSchema.values.find((v) => v.number === n)?.name ?? ""), (name) =>
    name.replace("IMAGE_FORMAT_", "").replace("WEBP", "WebP"),
  );
  const maxBytes = info.limits?.maxImageBytes;
  if (maxBytes) $("drop-hint").textContent = `PNG, JPEG or WebP, up to ${formatBytes(maxBytes)}`;
}

function applyMeshRanges(info: MeshInfo): void {
  const p = info.parameters;
  if (!p) return;
  setRange($<HTMLInputElement>("fg-ratio"), p.foregroundRatio);
  setRange($<HTMLInputElement>("mc-res"), p.mcResolution);
  const threshold = $<HTMLInputElement>("mc-threshold");
  if (p.mcThreshold) {
    threshold.max = String(p.mcThreshold.max);
    if (!threshold.dataset.touched) threshold.value = String(p.mcThreshold.defaultValue);
  }
  show($("bake-field"), p.canBakeTexture);
}

function fillSelect(select: HTMLSelectElement, names: string[], label: (name: string) => string): void {
  const wanted = names.filter(Boolean);
  if (!wanted.length) return;
  const current = select.value;
  select.replaceChildren(
    ...wanted.map((name) => {
      const option = el("option", "", label(name));
      option.value = name;
      return option;
    }),
  );
  if (wanted.includes(current)) select.value = current;
}

async function refreshStatus(): Promise<void> {
  const ask = async <T extends { model?: ModelInfo; limits?: ServerLimits }>(service: ServiceName, call: () => Promise<T>) => {
    try {
      const info = await call();
      setStatus(service, info.model, info.limits);
      status[service] = info.limits;
      return info;
    } catch (error) {
      setStatus(service, undefined, undefined, describeError(error, service));
      return undefined;
    }
  };
  const [imageInfo, meshInfo] = await Promise.all([
    ask("img2img", () => img2img.getInfo({}, { timeoutMs: 5000 })),
    ask("mesh", () => mesh.getInfo({}, { timeoutMs: 5000 })),
  ]);
  if (imageInfo) {
    hooks.info.img2img = imageInfo;
    if (!rangesApplied.img2img) applyImg2ImgRanges(imageInfo);
    rangesApplied = { ...rangesApplied, img2img: true };
  }
  if (meshInfo) {
    hooks.info.mesh = meshInfo;
    if (!rangesApplied.mesh) applyMeshRanges(meshInfo);
    rangesApplied = { ...rangesApplied, mesh: true };
  }
}

// ---------------------------------------------------------------------------------------------
// The input image

interface Picture {
  bytes: Uint8Array<ArrayBuffer>;
  blob: Blob;
  url: string;
  name: string;
  width: number;
  height: number;
}

let input: Picture | undefined;

async function pictureFrom(blob: Blob, name: string): Promise<Picture> {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let width = 0;
  let height = 0;
  try {
    const bitmap = await createImageBitmap(blob);
    ({ width, height } = bitmap);
    bitmap.close();
  } catch {
    // The browser cannot decode it; the server has the last word and will say what is wrong.
  }
  return { bytes, blob, url: URL.createObjectURL(blob), name, width, height };
}

async function setInput(blob: Blob, name: string): Promise<void> {
  const errorBox = $("err-image");
  errorBox.textContent = "";
  $("drop").removeAttribute("aria-invalid");
  // A complaint about the previous image no longer applies.
  if ($("gen-alert").dataset.code === "INVALID_ARGUMENT") hideAlert($("gen-alert"));
  const maxBytes = status.img2img ? Number(status.img2img.maxImageBytes) : 0;
  if (maxBytes && blob.size > maxBytes) {
    errorBox.textContent = `Image is ${formatBytes(blob.size)}, more than the ${formatBytes(maxBytes)} the server accepts. Use a smaller file.`;
    return;
  }
  const picture = await pictureFrom(blob, name);
  if (input) URL.revokeObjectURL(input.url);
  input = picture;
  const preview = $<HTMLImageElement>("input-preview");
  preview.src = picture.url;
  show(preview, picture.width > 0);
  $("drop").dataset.state = "filled";
  const size = picture.width ? `${picture.width} × ${picture.height} · ` : "preview unavailable · ";
  $("file-meta").textContent = `${name} · ${size}${formatBytes(picture.bytes.length)}`;
  show($("input-to-3d"));
}

/** A terracotta pot on a pale backdrop, drawn here so the page works with nothing to upload. */
async function sampleImage(): Promise<Blob> {
  const size = 512;
  const canvas = el("canvas");
  canvas.width = size;
  canvas.height = size;
  const g = canvas.getContext("2d");
  if (!g) throw new Error("no 2D canvas");
  const backdrop = g.createLinearGradient(0, 0, 0, size);
  backdrop.addColorStop(0, "#f4efe6");
  backdrop.addColorStop(1, "#e2d8c8");
  g.fillStyle = backdrop;
  g.fillRect(0, 0, size, size);
  g.fillStyle = "rgba(60, 40, 20, 0.18)";
  g.beginPath();
  g.ellipse(256, 430, 130, 22, 0, 0, Math.PI * 2);
  g.fill();
  const body = g.createRadialGradient(210, 250, 20, 256, 290, 190);
  body.addColorStop(0, "#e8844f");
  body.addColorStop(0.6, "#c2582a");
  body.addColorStop(1, "#7a3315");
  g.fillStyle = body;
  g.beginPath();
  g.moveTo(196, 130);
  g.bezierCurveTo(196, 175, 120, 200, 118, 290);
  g.bezierCurveTo(116, 370, 170, 430, 256, 432);
  g.bezierCurveTo(342, 430, 396, 370, 394, 290);
  g.bezierCurveTo(392, 200, 316, 175, 316, 130);
  g.closePath();
  g.fill();
  g.fillStyle = "#a9471f";
  g.beginPath();
  g.ellipse(256, 128, 72, 16, 0, 0, Math.PI * 2);
  g.fill();
  g.fillStyle = "#5b240d";
  g.beginPath();
  g.ellipse(256, 128, 56, 10, 0, 0, Math.PI * 2);
  g.fill();
  g.strokeStyle = "rgba(255, 230, 200, 0.55)";
  g.lineWidth = 6;
  g.beginPath();
  g.moveTo(140, 270);
  g.quadraticCurveTo(256, 300, 372, 270);
  g.stroke();
  return new Promise((resolve, reject) => canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("toBlob failed"))), "image/png"));
}

function setUpInput(): void {
  const drop = $("drop");
  const file = $<HTMLInputElement>("file");
  const pick = () => file.click();
  drop.addEventListener("click", pick);
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      pick();
    }
  });
  file.addEventListener("change", () => {
    const chosen = file.files?.[0];
    if (chosen) void setInput(chosen, chosen.name);
    file.value = "";
  });
  let depth = 0;
  drop.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    drop.classList.add("over");
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
  });
  drop.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) drop.classList.remove("over");
  });
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    drop.classList.remove("over");
    const dropped = event.dataTransfer?.files?.[0];
    if (dropped) void setInput(dropped, dropped.name);
  });
  // A file dropped anywhere else must not make the browser navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  document.addEventListener("paste", (event) => {
    const pasted = Array.from(event.clipboardData?.files ?? []).find((f) => f.type.startsWith("image/"));
    if (pasted) void setInput(pasted, pasted.name || "pasted image");
  });
  $("sample").addEventListener("click", async () => void setInput(await sampleImage(), "sample-pot.png"));
  $("input-to-3d").addEventListener("click", () => {
    if (input) void makeMesh(input.bytes, input.url, `from ${input.name}`);
  });
}

// ---------------------------------------------------------------------------------------------
// img2img: generate with progress and previews

interface Shown {
  jobId: string;
  file: ArtifactFile;
  url: string;
  result: Img2ImgResult;
  elapsedS: number;
}

let generation: AbortController | undefined;
let current: Shown | undefined;
const history: Shown[] = [];
let previewUrl: string | undefined;

function setGenerating(running: boolean): void {
  $<HTMLButtonElement>("generate").disabled = running;
  show($("cancel"), running);
  $("result-panel").setAttribute("aria-busy", String(running));
}

function showPreview(data: Uint8Array<ArrayBuffer>, mediaType: string, label: string): void {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(new Blob([data], { type: mediaType }));
  const preview = $<HTMLImageElement>("preview-img");
  preview.src = previewUrl;
  show(preview);
  show($<HTMLImageElement>("result-img"), false);
  show($("gen-empty"), false);
  const badge = $("preview-badge");
  badge.textContent = label;
  show(badge);
  $("gen-stage-box").dataset.state = "preview";
}

function readGenerateForm(): { request: Parameters<typeof img2img.generate>[0]; problems: FieldProblem[] } {
  const prompt = $<HTMLTextAreaElement>("prompt").value;
  const seedText = $<HTMLInputElement>("seed").value.trim();
  const live = $<HTMLInputElement>("live-preview").checked;
  const problems: FieldProblem[] = [];
  if (!input) problems.push({ field: "image", description: "is needed: drop one above, paste one, or try the sample" });
  if (!prompt.trim()) problems.push({ field: "prompt", description: "is needed: say what the new image should show" });
  const request = {
    image: input?.bytes ?? new Uint8Array(),
    prompt,
    negativePrompt: $<HTMLTextAreaElement>("negative").value,
    strength: Number($<HTMLInputElement>("strength").value),
    numInferenceSteps: Number($<HTMLInputElement>("steps").value),
    guidanceScale: Number($<HTMLInputElement>("guidance").value),
    ...(seedText !== "" ? { seed: Number(seedText) } : {}),
    scheduler: enumNumber(SchedulerSchema, $<HTMLSelectElement>("scheduler").value),
    outputFormat: enumNumber(ImageFormatSchema, $<HTMLSelectElement>("format").value),
    previewEveryNSteps: live ? Number($<HTMLInputElement>("preview-every").value) || 0 : 0,
    // Inline when it fits the server's inline limit, chunks otherwise: never a second download.
    delivery: ArtifactDelivery.INLINE,
    clientRequestId: `web-${Date.now().toString(36)}`,
  };
  return { request, problems };
}

async function generate(): Promise<void> {
  if (generation) return;
  clearFieldErrors("img2img");
  const alert = $("gen-alert");
  hideAlert(alert);
  const { request, problems } = readGenerateForm();
  if (problems.length) {
    for (const problem of problems) showFieldError("img2img", problem);
    (problems[0]?.field === "image" ? $("drop") : $("prompt")).focus();
    return;
  }
  const controller = new AbortController();
  generation = controller;
  setGenerating(true);
  const bar = $("gen-bar");
  const stageLabel = $("gen-stage");
  const eta = $("gen-eta");
  show($("gen-progress"));
  setBar(bar, 0, "Starting");
  stageLabel.textContent = "Sending the image…";
  eta.textContent = "";
  $("gen-job").textContent = "";
  const started = performance.now();
  const handlers: JobHandlers = {
    any: (kind) => logEvent("img2img", kind),
    accepted: (event) => {
      $("gen-job").textContent = `job ${event.jobId}`;
      stageLabel.textContent = event.queuePosition > 0 ? `Queued · ${event.queuePosition} ahead` : "Starting…";
    },
    queued: (event) => {
      announce("gen-announce", "Queued");
      stageLabel.textContent = `Queued · position ${event.position}`;
      eta.textContent = waitText(seconds(event.eta));
      setBar(bar, 0, stageLabel.textContent);
    },
    progress: (event) => {
      announce("gen-announce", IMG2IMG_STAGES[event.stage] ?? "Working");
      const text = `${IMG2IMG_STAGES[event.stage] ?? "Working"}${stepText(event)}`;
      stageLabel.textContent = text;
      eta.textContent = etaText(seconds(event.eta));
      setBar(bar, event.fraction, text);
      if (event.preview?.data.length) {
        showPreview(new Uint8Array(event.preview.data), event.preview.mediaType, `Preview · step ${event.step}`);
        logEvent("img2img", "preview-shown");
      }
    },
    chunk: (_event, received) => {
      stageLabel.textContent = `Receiving · ${formatBytes(received)}`;
    },
  };
  try {
    const outcome = await runJob(img2img.generate(request, { signal: controller.signal }), "img2img", handlers, controller.signal);
    const file = outcome.files[0];
    if (!file) throw new Error("the result carried no image");
    setBar(bar, 1, "Done");
    stageLabel.textContent = "Done";
    announce("gen-announce", "The image is ready");
    eta.textContent = "";
    await showResult({
      jobId: outcome.jobId,
      file,
      url: URL.createObjectURL(file.blob),
      result: outcome.result,
      elapsedS: (performance.now() - started) / 1000,
    });
    show($("gen-progress"), false);
  } catch (error) {
    const ui = error instanceof StreamError ? error.ui : describeError(error, "img2img");
    show($("gen-progress"), false);
    resetStageAfterFailure();
    showAlert(alert, "img2img", ui, () => void generate());
  } finally {
    generation = undefined;
    setGenerating(false);
  }
}

function resetStageAfterFailure(): void {
  show($("preview-img"), false);
  show($("preview-badge"), false);
  if (current) {
    show($<HTMLImageElement>("result-img"));
    $("gen-stage-box").dataset.state = "result";
  } else {
    show($("gen-empty"));
    $("gen-stage-box").dataset.state = "empty";
  }
}

async function showResult(shown: Shown): Promise<void> {
  current = shown;
  const image = $<HTMLImageElement>("result-img");
  image.src = shown.url;
  await image.decode().catch(() => undefined);
  show(image);
  show($("preview-img"), false);
  show($("preview-badge"), false);
  show($("gen-empty"), false);
  $("gen-stage-box").dataset.state = "result";
  $("gen-job").textContent = `job ${shown.jobId}`;
  const { result, file } = shown;
  const p = result.parameters;
  const rows: [string, string][] = [
    ["Seed", String(p?.seed ?? "")],
    ["Steps", p ? `${p.stepsRun} run (of ${p.numInferenceSteps} × strength ${p.strength.toFixed(2)})` : ""],
    ["Sampler", p ? schedulerLabel(SchedulerSchema.values.find((v) => v.number === p.scheduler)?.name ?? "") : ""],
    ["Size", `${result.width} × ${result.height} · ${formatBytes(file.bytes.length)}`],
    ["Time", formatSeconds(shown.elapsedS)],
    ["Model", result.provenance ? `${shortModelName(result.provenance.modelId)} on ${result.provenance.device}` : ""],
    ["Checksum", file.integrity === "verified" ? "SHA-256 verified" : "not verified (needs https)"],
  ];
  if (p?.promptTruncated) rows.push(["Note", "The prompt was longer than the model reads and was cut."]);
  const meta = $("result-meta");
  meta.replaceChildren(...rows.filter(([, v]) => v).flatMap(([k, v]) => [el("dt", "", k), el("dd", "", v)]));
  show(meta);
  const download = $<HTMLAnchorElement>("download-image");
  download.href = shown.url;
  download.download = `kiln-${shown.jobId}.${extensionFor(file.artifact.mediaType)}`;
  show($("result-actions"));
  if (!history.includes(shown)) addToHistory(shown);
}

function addToHistory(shown: Shown): void {
  history.unshift(shown);
  for (const old of history.splice(12)) URL.revokeObjectURL(old.url);
  const list = $("history");
  list.replaceChildren(
    ...history.map((item) => {
      const li = el("li");
      const button = el("button", "thumb");
      button.type = "button";
      button.setAttribute("aria-label", `Show the image of job ${item.jobId} (seed ${item.result.parameters?.seed ?? "?"})`);
      if (item === current) button.setAttribute("aria-current", "true");
      const img = el("img");
      img.src = item.url;
      img.alt = "";
      button.append(img);
      button.addEventListener("click", () => {
        void showResult(item);
        for (const b of list.querySelectorAll("button")) b.removeAttribute("aria-current");
        button.setAttribute("aria-current", "true");
      });
      li.append(button);
      return li;
    }),
  );
  show($("history-wrap"), history.length > 1);
}

function setUpGenerate(): void {
  const form = $<HTMLFormElement>("gen-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    void generate();
  });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      void generate();
    }
  });
  for (const control of form.querySelectorAll<HTMLInputElement>("input, textarea, select")) {
    control.addEventListener("change", () => (control.dataset.touched = "1"));
  }
  for (const [id, digits] of [
    ["strength", 2],
    ["guidance", 1],
    ["fg-ratio", 2],
  ] as const) {
    const range = $<HTMLInputElement>(id);
    const output = $<HTMLOutputElement>(`${id}-out`);
    const update = () => (output.value = Number(range.value).toFixed(digits));
    range.addEventListener("input", update);
    update();
  }
  $("cancel").addEventListener("click", () => {
    $("gen-stage").textContent = "Cancelling…";
    generation?.abort();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && generation) generation.abort();
  });
  $("seed-random").addEventListener("click", () => {
    const seed = $<HTMLInputElement>("seed");
    seed.value = "";
    seed.focus();
  });
  $("reuse-seed").addEventListener("click", () => {
    const seed = current?.result.parameters?.seed;
    if (seed !== undefined) {
      $<HTMLInputElement>("seed").value = String(seed);
      $<HTMLInputElement>("seed").dataset.touched = "1";
    }
  });
  $("use-as-input").addEventListener("click", () => {
    if (current) void setInput(current.file.blob, `kiln-${current.jobId}.${extensionFor(current.file.artifact.mediaType)}`);
  });
  $("result-to-3d").addEventListener("click", () => {
    if (current) void makeMesh(current.file.bytes, current.url, `from job ${current.jobId}`);
  });
}

// ---------------------------------------------------------------------------------------------
// mesh: stages, chunked download, the viewer

const viewer = new MeshViewer($("viewer"), $("viewer-fallback"));
let meshRun: AbortController | undefined;
let meshUrl: string | undefined;
let meshName = "kiln-mesh";

type MeshRow = "background" | "encode" | "extract" | "export" | "receive" | "view";
const MESH_ROWS: MeshRow[] = ["background", "encode", "extract", "export", "receive", "view"];
const MESH_STAGE_ROWS: Partial<Record<Stage, MeshRow>> = {
  [Stage.PREPROCESS]: "background",
  [Stage.REMOVE_BACKGROUND]: "background",
  [Stage.ENCODE]: "encode",
  [Stage.VENDOR_SUBMITTED]: "encode",
  [Stage.VENDOR_WAITING]: "encode",
  [Stage.EXTRACT]: "extract",
  [Stage.VENDOR_RECEIVED]: "export",
  [Stage.EXPORT]: "export",
  [Stage.POSTPROCESS]: "export",
};
const MESH_LABELS: Record<MeshRow, string> = {
  background: "Removing the background",
  encode: "Reading the shape",
  extract: "Extracting the surface",
  export: "Writing the GLB",
  receive: "Downloading",
  view: "Loading the viewer",
};

function setMeshRow(active: MeshRow | "done", detail = ""): void {
  const at = active === "done" ? MESH_ROWS.length : MESH_ROWS.indexOf(active);
  for (const [index, row] of MESH_ROWS.entries()) {
    const item = $("mesh-stages").querySelector<HTMLElement>(`[data-stage="${row}"]`);
    if (!item) continue;
    const was = item.dataset.state;
    if (index < at) item.dataset.state = was === "active" || was === "done" ? "done" : "skipped";
    else if (index === at) item.dataset.state = "active";
    else item.dataset.state = "pending";
    const extra = item.querySelector<HTMLElement>(".stage-detail");
    if (extra) extra.textContent = index === at ? detail : item.dataset.state === "skipped" ? "skipped" : extra.textContent;
    if (index === at) item.setAttribute("aria-current", "step");
    else item.removeAttribute("aria-current");
  }
}

function setMeshRunning(running: boolean): void {
  show($("mesh-cancel"), running);
  $<HTMLButtonElement>("result-to-3d").disabled = running;
  $<HTMLButtonElement>("input-to-3d").disabled = running || !input;
  $("mesh-panel").setAttribute("aria-busy", String(running));
}

async function makeMesh(image: Uint8Array<ArrayBuffer>, sourceUrl: string, sourceLabel: string): Promise<void> {
  if (meshRun) return;
  clearFieldErrors("mesh");
  const alert = $("mesh-alert");
  hideAlert(alert);
  const controller = new AbortController();
  meshRun = controller;
  setMeshRunning(true);
  $("mesh-panel").scrollIntoView({ behavior: "smooth", block: "nearest" });
  $<HTMLImageElement>("mesh-source-img").src = sourceUrl;
  $("mesh-source-label").textContent = sourceLabel;
  show($("mesh-source"));
  show($("mesh-empty"), false);
  const stages = $("mesh-stages");
  for (const item of stages.querySelectorAll<HTMLElement>("li")) {
    item.dataset.state = "pending";
    const extra = item.querySelector<HTMLElement>(".stage-detail");
    if (extra) extra.textContent = "";
  }
  show(stages);
  const bar = $("mesh-bar");
  const label = $("mesh-stage-label");
  const eta = $("mesh-eta");
  show($("mesh-progress"));
  setBar(bar, 0, "Starting");
  label.textContent = "Sending the image…";
  eta.textContent = "";
  $("mesh-job").textContent = "";
  const started = performance.now();
  const bake = $<HTMLInputElement>("bake");
  const request = {
    image,
    removeBackground: enumNumber(RemoveBackgroundSchema, $<HTMLSelectElement>("remove-bg").value),
    foregroundRatio: Number($<HTMLInputElement>("fg-ratio").value),
    mcResolution: Number($<HTMLInputElement>("mc-res").value),
    mcThreshold: Number($<HTMLInputElement>("mc-threshold").value),
    outputFormat: MeshFormat.GLB,
    bakeTexture: !$("bake-field").hidden && bake.checked,
    frame: MeshFrame.Y_UP,
    // Chunks: meshes outgrow the inline limit, and the download shows progress as it arrives.
    delivery: ArtifactDelivery.CHUNKED,
    clientRequestId: `web-${Date.now().toString(36)}`,
  };
  const handlers: JobHandlers = {
    any: (kind) => logEvent("mesh", kind),
    accepted: (event) => {
      $("mesh-job").textContent = `job ${event.jobId}`;
      label.textContent = event.queuePosition > 0 ? `Queued · ${event.queuePosition} ahead` : "Starting…";
    },
    queued: (event) => {
      label.textContent = `Queued · position ${event.position}`;
      eta.textContent = waitText(seconds(event.eta));
    },
    progress: (event) => {
      const row = MESH_STAGE_ROWS[event.stage] ?? "encode";
      announce("mesh-announce", MESH_LABELS[row]);
      const steps = event.totalSteps > 0 ? `${event.step} / ${event.totalSteps}` : "";
      setMeshRow(row, steps);
      label.textContent = MESH_LABELS[row] + (steps ? ` · ${steps}` : "");
      eta.textContent = etaText(seconds(event.eta));
      setBar(bar, event.fraction * 0.95, label.textContent);
    },
    chunk: (_event, received) => {
      setMeshRow("receive", formatBytes(received));
      label.textContent = `Downloading · ${formatBytes(received)}`;
      eta.textContent = "";
    },
  };
  try {
    const outcome = await runJob(mesh.generate(request, { signal: controller.signal }), "mesh", handlers, controller.signal);
    const file = outcome.files[0];
    if (!file) throw new Error("the result carried no mesh");
    setMeshRow("view", formatBytes(file.bytes.length));
    label.textContent = MESH_LABELS.view;
    setBar(bar, 0.97, label.textContent);
    $("viewer").dataset.state = "loading";
    const stats = await viewer.load(file.bytes);
    logEvent("mesh", "viewer-loaded");
    announce("mesh-announce", "The mesh is ready");
    setMeshRow("done");
    setBar(bar, 1, "Done");
    show($("mesh-progress"), false);
    showMesh(outcome.jobId, file, outcome.result, stats.meshes, (performance.now() - started) / 1000);
  } catch (error) {
    const ui = error instanceof StreamError ? error.ui : describeError(error, "mesh");
    show($("mesh-progress"), false);
    for (const item of stages.querySelectorAll<HTMLElement>('[data-state="active"]')) item.dataset.state = ui.kind === "cancelled" ? "pending" : "failed";
    showAlert(alert, "mesh", ui, () => void makeMesh(image, sourceUrl, sourceLabel));
  } finally {
    meshRun = undefined;
    setMeshRunning(false);
  }
}

function showMesh(jobId: string, file: ArtifactFile, result: MeshResult, meshes: number, elapsedS: number): void {
  if (meshUrl) URL.revokeObjectURL(meshUrl);
  meshUrl = URL.createObjectURL(file.blob);
  meshName = `kiln-${jobId}`;
  const viewerBox = $("viewer");
  viewerBox.dataset.state = "ready";
  show($("viewer-empty"), false);
  show($("viewer-tools"), viewer.webgl);
  const p = result.parameters;
  const rows: [string, string][] = [
    ["Vertices", formatCount(result.vertexCount)],
    ["Triangles", formatCount(result.faceCount)],
    ["File", `GLB · ${formatBytes(file.bytes.length)}${meshes > 1 ? ` · ${meshes} meshes` : ""}`],
    ["Detail", p ? `${p.mcResolution}³ grid` : ""],
    ["Background", p ? (p.backgroundRemoved ? "removed" : "kept") : ""],
    ["Time", formatSeconds(elapsedS)],
    ["Checksum", file.integrity === "verified" ? "SHA-256 verified" : "not verified (needs https)"],
  ];
  const meta = $("mesh-meta");
  meta.replaceChildren(...rows.filter(([, v]) => v).flatMap(([k, v]) => [el("dt", "", k), el("dd", "", v)]));
  show(meta);
  const glb = $<HTMLAnchorElement>("download-glb");
  glb.href = meshUrl;
  glb.download = `${meshName}.glb`;
  show($("mesh-actions"));
}

function setUpMesh(): void {
  $("mesh-cancel").addEventListener("click", () => {
    $("mesh-stage-label").textContent = "Cancelling…";
    meshRun?.abort();
  });
  for (const id of ["remove-bg", "fg-ratio", "mc-res", "mc-threshold", "bake"]) {
    const control = $<HTMLInputElement>(id);
    control.addEventListener("change", () => (control.dataset.touched = "1"));
  }
  $("view-reset").addEventListener("click", () => viewer.resetView());
  const toggle = (id: string, apply: (on: boolean) => void) => {
    const button = $(id);
    button.addEventListener("click", () => {
      const on = button.getAttribute("aria-pressed") !== "true";
      button.setAttribute("aria-pressed", String(on));
      apply(on);
    });
  };
  toggle("view-wire", (on) => viewer.setWireframe(on));
  toggle("view-spin", (on) => viewer.setSpin(on));
  $("download-obj").addEventListener("click", () =>
    downloadBlob(new Blob([viewer.exportObj()], { type: "model/obj" }), `${meshName}.obj`),
  );
  $("download-ply").addEventListener("click", () =>
    downloadBlob(new Blob([viewer.exportPly()], { type: "application/octet-stream" }), `${meshName}.ply`),
  );
}

// ---------------------------------------------------------------------------------------------
// Start

$("origin").textContent = location.host;
setUpInput();
setUpGenerate();
setUpMesh();
void refreshStatus();
// Keep the server pills honest (a model that finished loading, a server that went away), but
// only while someone is looking at the page.
window.setInterval(() => {
  if (document.visibilityState === "visible") void refreshStatus();
}, 15_000);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") void refreshStatus();
});
