// Make 3D: the mesh stages, the chunked download, the viewer and its downloads; after a reload,
// the same for a mesh job this browser started (reattached with WatchJob) or its stored result.
import { clearFieldErrors, hideAlert, showAlert } from "./alerts.js";
import { CONTROL_TIMEOUT_MS, jobCallOptions, mesh, newClientRequestId } from "./api.js";
import { $, downloadBlob, el, enumNumber, show } from "./dom.js";
import { describeError } from "./errors.js";
import { FollowedJob, reattach, retryAfter, type FollowOptions } from "./followed.js";
import { formatBytes, formatCount, formatSeconds, seconds } from "./format.js";
import { ArtifactDelivery } from "./gen/kiln/common/v1/artifact_pb.js";
import { DisconnectPolicy, JobState, Stage, type Progress } from "./gen/kiln/common/v1/job_pb.js";
import { MeshFormat, MeshFrame, RemoveBackgroundSchema, type Result as MeshResult } from "./gen/kiln/mesh/v1/mesh_service_pb.js";
import { logEvent } from "./hooks.js";
import { artifactFiles, jobSeconds, runJob, StreamError, type ArtifactFile, type JobHandlers, type JobSource } from "./jobs.js";
import { jobsShownChanged, type JobView } from "./myjobs.js";
import { announce, etaText, setBar, waitText } from "./progress.js";
import { input, viewer } from "./state.js";

let meshRun: FollowedJob | undefined;
let meshUrl: string | undefined;
let meshName = "kiln-mesh";
/** The job whose mesh the viewer shows. */
let shownMeshJob: string | undefined;

type MeshRow = "background" | "encode" | "extract" | "export" | "receive" | "view";
const MESH_ROWS: MeshRow[] = ["background", "encode", "extract", "export", "receive", "view"];
const MESH_STAGE_ROWS: Partial<Record<Stage, MeshRow>> = {
  // The first row stays active while an unloaded model loads; its label says so.
  [Stage.LOAD_MODEL]: "background",
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
const LOAD_MODEL_LABEL = "Loading the model";
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

function meshStageTitle(progress: Progress): string {
  return progress.stage === Stage.LOAD_MODEL ? LOAD_MODEL_LABEL : MESH_LABELS[MESH_STAGE_ROWS[progress.stage] ?? "encode"];
}

function watchFrom(run: FollowedJob): JobSource<MeshResult>["resume"] {
  return (jobId, after) => mesh.watchJob({ jobId, afterSequence: after }, run.callOptions());
}

/** Shows where the mesh comes from: the source image, or only a label when it is not at hand. */
function showSource(sourceUrl: string | undefined, sourceLabel: string): void {
  const image = $<HTMLImageElement>("mesh-source-img");
  if (sourceUrl) image.src = sourceUrl;
  else image.removeAttribute("src");
  show(image, sourceUrl !== undefined);
  $("mesh-source-label").textContent = sourceLabel;
  show($("mesh-source"));
  show($("mesh-empty"), false);
}

export async function makeMesh(image: Uint8Array<ArrayBuffer>, sourceUrl: string, sourceLabel: string): Promise<void> {
  if (meshRun) return;
  clearFieldErrors("mesh");
  hideAlert($("mesh-alert"));
  $("mesh-panel").scrollIntoView({ behavior: "smooth", block: "nearest" });
  showSource(sourceUrl, sourceLabel);
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
    clientRequestId: newClientRequestId(),
    // Survives a reload for the server's grace period, as img2img jobs do (see generate.ts).
    onDisconnect: DisconnectPolicy.WAIT_FOR_WATCHER,
  };
  const run = new FollowedJob("mesh", meshStageTitle);
  await follow(run, { first: mesh.generate(request, run.callOptions()), resume: watchFrom(run) }, Date.now(), {
    starting: "Sending the image…",
    retry: () => void makeMesh(image, sourceUrl, sourceLabel),
  });
}

/** Whether the panel is free to follow or show another job. */
export function meshBusy(): boolean {
  return meshRun !== undefined;
}

/** The job whose mesh the viewer shows, if any. */
export function meshShown(): string | undefined {
  return shownMeshJob;
}

/**
 * Follow a queued or running mesh job of this browser's, from the last event it handled (after
 * a reload). False when the panel is busy with another job.
 */
export function resumeMesh(view: JobView): boolean {
  if (meshRun) return false;
  clearFieldErrors("mesh");
  hideAlert($("mesh-alert"));
  showSource(undefined, `job ${view.id}, started before this page loaded`);
  const run = new FollowedJob("mesh", meshStageTitle, view);
  const { source, options } = reattach(view, watchFrom(run));
  void follow(run, source, view.created, options);
  return true;
}

/** Cancels the job the panel follows, if it is `jobId`; false when it follows another one (or none). */
export function cancelMesh(jobId: string): boolean {
  if (!meshRun || meshRun.jobId !== jobId) return false;
  $("mesh-stage-label").textContent = "Cancelling…";
  void meshRun.cancel();
  return true;
}

async function follow(run: FollowedJob, source: JobSource<MeshResult>, created: number, options: FollowOptions): Promise<void> {
  meshRun = run;
  setMeshRunning(true);
  const alert = $("mesh-alert");
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
  setBar(bar, (options.fraction ?? 0) * 0.95, options.starting);
  label.textContent = options.starting;
  eta.textContent = "";
  $("mesh-job").textContent = run.jobId ? `job ${run.jobId}` : "";
  const handlers: JobHandlers = run.handlers({
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
      const title = meshStageTitle(event);
      announce("mesh-announce", title);
      const steps = event.totalSteps > 0 ? `${event.step} / ${event.totalSteps}` : "";
      setMeshRow(row, steps);
      label.textContent = title + (steps ? ` · ${steps}` : "");
      eta.textContent = etaText(seconds(event.eta));
      setBar(bar, event.fraction * 0.95, label.textContent);
    },
    chunk: (_event, received) => {
      setMeshRow("receive", formatBytes(received));
      label.textContent = `Downloading · ${formatBytes(received)}`;
      eta.textContent = "";
    },
    reconnecting: () => {
      label.textContent = "Connection lost · reconnecting…";
    },
  });
  try {
    const outcome = await runJob(source, "mesh", handlers, run.signal);
    run.ended(JobState.SUCCEEDED);
    const file = outcome.files[0];
    if (!file) throw new Error("the result carried no mesh");
    setMeshRow("view", formatBytes(file.bytes.length));
    label.textContent = MESH_LABELS.view;
    setBar(bar, 0.97, label.textContent);
    await loadIntoViewer(outcome.jobId, file, outcome.result, (Date.now() - created) / 1000);
    setMeshRow("done");
    setBar(bar, 1, "Done");
    show($("mesh-progress"), false);
  } catch (error) {
    const terminal = error instanceof StreamError;
    const ui = run.cancelFailure ?? (terminal ? error.ui : describeError(error, "mesh"));
    run.ended(terminal ? (ui.kind === "cancelled" ? JobState.CANCELLED : JobState.FAILED) : undefined, ui);
    show($("mesh-progress"), false);
    for (const item of stages.querySelectorAll<HTMLElement>('[data-state="active"]')) item.dataset.state = ui.kind === "cancelled" ? "pending" : "failed";
    showAlert(alert, "mesh", ui, retryAfter(run, terminal, options, (view) => void resumeMesh(view)));
  } finally {
    meshRun = undefined;
    run.release();
    setMeshRunning(false);
  }
}

async function loadIntoViewer(jobId: string, file: ArtifactFile, result: MeshResult, elapsedS: number): Promise<void> {
  $("viewer").dataset.state = "loading";
  const stats = await viewer.load(file.bytes);
  logEvent("mesh", "viewer-loaded");
  announce("mesh-announce", "The mesh is ready");
  showMesh(jobId, file, result, stats.meshes, elapsedS);
}

/** Shows a finished mesh job's stored result (GetJob; the GLB is downloaded by reference). */
export async function showMeshJob(jobId: string, session: string | undefined): Promise<void> {
  if (meshRun) return;
  const alert = $("mesh-alert");
  hideAlert(alert);
  try {
    const job = (await mesh.getJob({ jobId }, jobCallOptions(session, undefined, CONTROL_TIMEOUT_MS))).job;
    if (!job?.result) return; // not (or no longer) a success: the jobs list says what it is
    const file = (await artifactFiles(job.result.artifacts, new AbortController().signal))[0];
    if (!file) throw new Error("the result carried no mesh");
    const elapsedS = jobSeconds(job.status);
    showSource(undefined, `job ${jobId}`);
    $("mesh-job").textContent = `job ${jobId}`;
    await loadIntoViewer(jobId, file, job.result, elapsedS);
  } catch (error) {
    showAlert(alert, "mesh", describeError(error, "mesh"), () => void showMeshJob(jobId, session));
  }
}

function showMesh(jobId: string, file: ArtifactFile, result: MeshResult, meshes: number, elapsedS: number): void {
  if (meshUrl) URL.revokeObjectURL(meshUrl);
  meshUrl = URL.createObjectURL(file.blob);
  meshName = `kiln-${jobId}`;
  shownMeshJob = jobId;
  jobsShownChanged();
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

export function setUpMesh(): void {
  $("mesh-cancel").addEventListener("click", () => {
    if (!meshRun) return;
    $("mesh-stage-label").textContent = "Cancelling…";
    void meshRun.cancel();
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
