// What several panels share: the input image, the servers' limits and the 3D viewer. It lives
// here rather than with the code that sets it, so the panels that read it never import each other.
import { $ } from "./dom.js";
import type { ServerLimits } from "./gen/kiln/common/v1/service_info_pb.js";
import { MeshViewer } from "./viewer.js";

export interface Picture {
  bytes: Uint8Array<ArrayBuffer>;
  blob: Blob;
  url: string;
  name: string;
  width: number;
  height: number;
}

export let input: Picture | undefined;

/** Replaces the input image and frees the previous one's object URL. */
export function replaceInput(picture: Picture): void {
  if (input) URL.revokeObjectURL(input.url);
  input = picture;
}

/** Each server's limits, from its latest GetInfo answer. */
export const status = { img2img: undefined as ServerLimits | undefined, mesh: undefined as ServerLimits | undefined };

export const viewer = new MeshViewer($("viewer"), $("viewer-fallback"));
