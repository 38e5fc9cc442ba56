// img2img: generate with progress and previews, the result and its history; after a reload,
// the same for a job this browser started (reattached with WatchJob) or its stored result.
import { clearFieldErrors, hideAlert, showAlert, showFieldError } from "./alerts.js";
import { CONTROL_TIMEOUT_MS, img2img, jobCallOptions, newClientRequestId } from "./api.js";
import { $, el, enumNumber, show } from "./dom.js";
import { describeError, type FieldProblem } from "./errors.js";
import { FollowedJob, reattach, retryAfter, type FollowOptions } from "./followed.js";
import { extensionFor, formatBytes, formatSeconds, schedulerLabel, seconds, shortModelName } from "./format.js";
import { ArtifactDelivery } from "./gen/kiln/common/v1/artifact_pb.js";
import { DisconnectPolicy, JobState, Stage, type Progress } from "./gen/kiln/common/v1/job_pb.js";
import { ImageFormatSchema, SchedulerSchema, type Result as Img2ImgResult } from "./gen/kiln/img2img/v1/img2img_service_pb.js";
import { logEvent } from "./hooks.js";
import { setInput } from "./input.js";
import { artifactFiles, jobSeconds, runJob, StreamError, type ArtifactFile, type JobHandlers, type JobSource } from "./jobs.js";
import { makeMesh } from "./mesh.js";
import { jobsShownChanged, type JobView } from "./myjobs.js";
import { announce, etaText, setBar, stepText, waitText } from "./progress.js";
import { input } from "./state.js";

const IMG2IMG_STAGES: Partial<Record<Stage, string>> = {
  [Stage.LOAD_MODEL]: "Loading the model",
  [Stage.PREPROCESS]: "Preparing the image",
  [Stage.DENOISE]: "Denoising",
  [Stage.DECODE]: "Decoding",
  [Stage.POSTPROCESS]: "Saving",
  [Stage.VENDOR_SUBMITTED]: "Sent to the vendor",
  [Stage.VENDOR_WAITING]: "Waiting for the vendor",
  [Stage.VENDOR_RECEIVED]: "Received from the vendor",
};

interface Shown {
  jobId: string;
  file: ArtifactFile;
  url: string;
  result: Img2ImgResult;
  elapsedS: number;
}

let generation: FollowedJob | undefined;
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
    clientRequestId: newClientRequestId(),
    // A reload or a dropped connection leaves the job running for the server's grace period,
    // so the page can reattach; a job nobody comes back for is cancelled then. (The default,
    // stated so that a change of default on the server cannot change what the page promises.)
    onDisconnect: DisconnectPolicy.WAIT_FOR_WATCHER,
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
  const run = new FollowedJob("img2img", stageName);
  await follow(run, { first: img2img.generate(request, run.callOptions()), resume: watchFrom(run) }, Date.now(), {
    starting: "Sending the image…",
    retry: () => void generate(),
  });
}

function stageName(progress: Progress): string {
  return IMG2IMG_STAGES[progress.stage] ?? "Working";
}

function watchFrom(run: FollowedJob): JobSource<Img2ImgResult>["resume"] {
  return (jobId, after) => img2img.watchJob({ jobId, afterSequence: after }, run.callOptions());
}

/** Whether the panel is free to follow or show another job. */
export function generationBusy(): boolean {
  return generation !== undefined;
}

/** The job whose image the panel shows, if any. */
export function imageShown(): string | undefined {
  return current?.jobId;
}

/**
 * Follow a queued or running job of this browser's in the panel, from the last event it handled
 * (after a reload). False when the panel is busy with another job.
 */
export function resumeGeneration(view: JobView): boolean {
  if (generation) return false;
  clearFieldErrors("img2img");
  hideAlert($("gen-alert"));
  const run = new FollowedJob("img2img", stageName, view);
  const { source, options } = reattach(view, watchFrom(run));
  void follow(run, source, view.created, options);
  return true;
}

/** Cancels the job the panel follows, if it is `jobId`; false when it follows another one (or none). */
export function cancelGeneration(jobId: string): boolean {
  if (!generation || generation.jobId !== jobId) return false;
  $("gen-stage").textContent = "Cancelling…";
  void generation.cancel();
  return true;
}

async function follow(run: FollowedJob, source: JobSource<Img2ImgResult>, created: number, options: FollowOptions): Promise<void> {
  generation = run;
  setGenerating(true);
  const alert = $("gen-alert");
  const bar = $("gen-bar");
  const stageLabel = $("gen-stage");
  const eta = $("gen-eta");
  show($("gen-progress"));
  setBar(bar, options.fraction ?? 0, options.starting);
  stageLabel.textContent = options.starting;
  eta.textContent = "";
  $("gen-job").textContent = run.jobId ? `job ${run.jobId}` : "";
  const handlers: JobHandlers = run.handlers({
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
      announce("gen-announce", stageName(event));
      const text = `${stageName(event)}${stepText(event)}`;
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
    reconnecting: () => {
      stageLabel.textContent = "Connection lost · reconnecting…";
    },
  });
  try {
    const outcome = await runJob(source, "img2img", handlers, run.signal);
    const file = outcome.files[0];
    if (!file) throw new Error("the result carried no image");
    setBar(bar, 1, "Done");
    stageLabel.textContent = "Done";
    announce("gen-announce", "The image is ready");
    eta.textContent = "";
    run.ended(JobState.SUCCEEDED);
    await showResult({
      jobId: outcome.jobId,
      file,
      url: URL.createObjectURL(file.blob),
      result: outcome.result,
      elapsedS: (Date.now() - created) / 1000,
    });
    show($("gen-progress"), false);
  } catch (error) {
    const terminal = error instanceof StreamError;
    const ui = run.cancelFailure ?? (terminal ? error.ui : describeError(error, "img2img"));
    run.ended(terminal ? (ui.kind === "cancelled" ? JobState.CANCELLED : JobState.FAILED) : undefined, ui);
    show($("gen-progress"), false);
    resetStageAfterFailure();
    showAlert(alert, "img2img", ui, retryAfter(run, terminal, options, (view) => void resumeGeneration(view)));
  } finally {
    generation = undefined;
    run.release();
    setGenerating(false);
  }
}

/** Shows a finished job's stored result (GetJob; the image is downloaded by reference). */
export async function showImageJob(jobId: string, session: string | undefined): Promise<void> {
  if (generation) return;
  const alert = $("gen-alert");
  hideAlert(alert);
  try {
    const job = (await img2img.getJob({ jobId }, jobCallOptions(session, undefined, CONTROL_TIMEOUT_MS))).job;
    if (!job?.result) return; // not (or no longer) a success: the jobs list says what it is
    const file = (await artifactFiles(job.result.artifacts, new AbortController().signal))[0];
    if (!file) throw new Error("the result carried no image");
    const elapsedS = jobSeconds(job.status);
    await showResult({ jobId, file, url: URL.createObjectURL(file.blob), result: job.result, elapsedS });
  } catch (error) {
    showAlert(alert, "img2img", describeError(error, "img2img"), () => void showImageJob(jobId, session));
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
  jobsShownChanged();
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

export function setUpGenerate(): void {
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
  const cancel = () => {
    if (!generation) return;
    $("gen-stage").textContent = "Cancelling…";
    void generation.cancel();
  };
  $("cancel").addEventListener("click", cancel);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") cancel();
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
