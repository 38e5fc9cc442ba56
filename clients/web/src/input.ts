// The input image: pick, drop or paste one, or draw the sample.
import { hideAlert } from "./alerts.js";
import { $, el, show } from "./dom.js";
import { formatBytes } from "./format.js";
import { makeMesh } from "./mesh.js";
import { input, replaceInput, status, type Picture } from "./state.js";

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

export async function setInput(blob: Blob, name: string): Promise<void> {
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
  replaceInput(picture);
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

export function setUpInput(): void {
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
