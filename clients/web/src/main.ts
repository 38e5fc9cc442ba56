// Kiln's page: pick an image, generate a new one with live progress and previews, turn either
// into a mesh and look at it in 3D. All calls are gRPC-Web to the gateway serving this page.
import { onKeyChange, setUpAuth } from "./auth.js";
import { $ } from "./dom.js";
import { cancelGeneration, generationBusy, imageShown, resumeGeneration, setUpGenerate, showImageJob } from "./generate.js";
import "./hooks.js"; // installs `window.kiln`, which the browser tests read
import { setUpInput } from "./input.js";
import { setUpJobList } from "./joblist.js";
import { cancelMesh, meshBusy, meshShown, resumeMesh, setUpMesh, showMeshJob } from "./mesh.js";
import { refreshStatus } from "./status.js";

$("origin").textContent = location.host;
setUpAuth();
// A new key (or none) may change what the servers answer: ask them again.
onKeyChange(() => void refreshStatus());
setUpInput();
setUpGenerate();
setUpMesh();
// After a reload this browser's jobs come back: running ones reattach, finished ones show.
setUpJobList({
  img2img: { busy: generationBusy, shown: imageShown, resume: resumeGeneration, show: showImageJob, cancel: cancelGeneration },
  mesh: { busy: meshBusy, shown: meshShown, resume: resumeMesh, show: showMeshJob, cancel: cancelMesh },
});
void refreshStatus();
// Keep the server pills honest (a model that finished loading, a server that went away), but
// only while someone is looking at the page.
window.setInterval(() => {
  if (document.visibilityState === "visible") void refreshStatus();
}, 15_000);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") void refreshStatus();
});
