// Server status (GetInfo): the pills in the header, and the parameter ranges each server publishes.
import { Code, type CallOptions } from "@connectrpc/connect";
import { img2img, mesh } from "./api.js";
import { askOptions } from "./auth.js";
import { $, el, show } from "./dom.js";
import { describeError, type ServiceName, type UiError } from "./errors.js";
import { formatBytes, schedulerLabel, shortModelName } from "./format.js";
import { Readiness, type ModelInfo, type ServerLimits } from "./gen/kiln/common/v1/service_info_pb.js";
import {
  ImageFormatSchema,
  SchedulerSchema,
  type GetInfoResponse as Img2ImgInfo,
} from "./gen/kiln/img2img/v1/img2img_service_pb.js";
import type { GetInfoResponse as MeshInfo } from "./gen/kiln/mesh/v1/mesh_service_pb.js";
import { hooks } from "./hooks.js";
import { status } from "./state.js";

/** What a pill says when the gateway, not the server, turned the question down. */
const PILL_TEXT: Partial<Record<Code, string>> = {
  [Code.Unauthenticated]: "needs an API key",
  [Code.PermissionDenied]: "not allowed with this key",
};

/** The pills ask in the background: a 401 there never opens the key dialog (the person's next action does). */
function background(): CallOptions {
  return { timeoutMs: 5000, ...askOptions(false) };
}

let rangesApplied = { img2img: false, mesh: false };

function setStatus(service: ServiceName, model: ModelInfo | undefined, limits: ServerLimits | undefined, error?: UiError): void {
  const pill = $(`status-${service}`);
  const detail = pill.querySelector<HTMLElement>(".service-detail");
  const name = service === "img2img" ? "image server" : "3D server";
  if (!model || error) {
    pill.dataset.state = "down";
    if (detail) detail.textContent = error ? (PILL_TEXT[error.code] ?? "unreachable") : "unreachable";
    const refused = error && PILL_TEXT[error.code];
    pill.title = refused ? `${error.title}: ${error.message}` : `The ${name} does not answer${error ? `: ${error.message}` : ""}`;
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

export async function refreshStatus(): Promise<void> {
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
    ask("img2img", () => img2img.getInfo({}, background())),
    ask("mesh", () => mesh.getInfo({}, background())),
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
