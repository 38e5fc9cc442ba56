// Make 3D: the mesh stages, the chunked download, the viewer and its downloads.
import { clearFieldErrors, hideAlert, showAlert } from "./alerts.js";
import { mesh } from "./api.js";
import { $, downloadBlob, el, enumNumber, show } from "./dom.js";
import { describeError } from "./errors.js";
import { formatBytes, formatCount, formatSeconds, seconds } from "./format.js";
import { ArtifactDelivery } from "./gen/kiln/common/v1/artifact_pb.js";
import { Stage } from "./gen/kiln/common/v1/job_pb.js";
import { MeshFormat, MeshFrame, RemoveBackgroundSchema, type Result as MeshResult } from "./gen/kiln/mesh/v1/mesh_service_pb.js";
import { logEvent } from "./hooks.js";
import { runJob, StreamError, type ArtifactFile, type JobHandlers } from "./jobs.js";
import { announce, etaText, setBar, waitText } from "./progress.js";
import { input, viewer } from "./state.js";

let meshRun: AbortController | undefined;
let meshUrl: string | undefined;
let meshName = "kiln-mesh";

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

export async function makeMesh(image: Uint8Array<ArrayBuffer>, sourceUrl: string, sourceLabel: string): Promise<void> {
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
      const title = event.stage === Stage.LOAD_MODEL ? LOAD_MODEL_LABEL : MESH_LABELS[row];
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

export function setUpMesh(): void {
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
