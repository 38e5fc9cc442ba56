// Small formatting helpers shared by the page's panels.
import type { Duration } from "@bufbuild/protobuf/wkt";

/** A protobuf Duration in seconds (undefined stays undefined). */
export function seconds(duration: Duration | undefined): number | undefined {
  if (!duration) return undefined;
  return Number(duration.seconds) + duration.nanos / 1e9;
}

/** "0.4 s", "12 s", "3 min 5 s" — what people read on a progress bar. */
export function formatSeconds(value: number): string {
  if (value < 10) return `${Math.max(0, value).toFixed(1)} s`;
  if (value < 60) return `${Math.round(value)} s`;
  const minutes = Math.floor(value / 60);
  const rest = Math.round(value - minutes * 60);
  return rest ? `${minutes} min ${rest} s` : `${minutes} min`;
}

export function formatBytes(bytes: number | bigint): string {
  const n = Number(bytes);
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(n < 10 * 1024 ? 1 : 0)} KB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MB`;
}

export function formatCount(n: number | bigint): string {
  return Number(n).toLocaleString("en-US");
}

/** The last path segment of a model id ("…/tiny-models/diffusers" → "diffusers"). */
export function shortModelName(id: string): string {
  const parts = id.split(/[\\/]/).filter(Boolean);
  if (parts.length <= 2) return id;
  return parts.slice(-2).join("/");
}

/** "SCHEDULER_EULER_ANCESTRAL" → the name people know from other tools. */
export function schedulerLabel(name: string): string {
  const labels: Record<string, string> = {
    SCHEDULER_DPMPP_2M: "DPM++ 2M",
    SCHEDULER_EULER: "Euler",
    SCHEDULER_EULER_ANCESTRAL: "Euler a",
    SCHEDULER_DDIM: "DDIM",
    SCHEDULER_PNDM: "PNDM",
    SCHEDULER_LMS: "LMS",
  };
  return labels[name] ?? name.replace(/^SCHEDULER_/, "");
}

/** Sentence case for a field name: "num_inference_steps" → "Num inference steps". */
export function humanField(field: string): string {
  const text = field.replace(/[._]/g, " ").trim();
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/** File extension for a media type, for download names. */
export function extensionFor(mediaType: string): string {
  const known: Record<string, string> = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "model/gltf-binary": "glb",
    "model/obj": "obj",
    "text/plain": "txt",
  };
  return known[mediaType] ?? mediaType.split("/").pop()?.replace(/[^a-z0-9]/gi, "") ?? "bin";
}
