// Test and debugging hooks: `window.kiln` (the browser tests read these; harmless otherwise)
import type { ServiceName } from "./errors.js";
import type { GetInfoResponse as Img2ImgInfo } from "./gen/kiln/img2img/v1/img2img_service_pb.js";
import type { GetInfoResponse as MeshInfo } from "./gen/kiln/mesh/v1/mesh_service_pb.js";
import { jobViews } from "./myjobs.js";
import { viewer } from "./state.js";

interface LoggedEvent {
  job: ServiceName;
  kind: string;
  t: number;
  /** The event's sequence in its job (stream events; for "watch", the cursor it resumes after). */
  sequence?: number;
  jobId?: string;
}

export const hooks = {
  /** Every stream event as it arrived (performance.now() times). */
  events: [] as LoggedEvent[],
  viewer: {
    meshCount: (): number => viewer.meshCount(),
    pixelStats: () => viewer.pixelStats(),
    webgl: (): boolean => viewer.webgl,
  },
  info: { img2img: undefined as Img2ImgInfo | undefined, mesh: undefined as MeshInfo | undefined },
  /** This browser's jobs as the jobs list shows them, newest first. */
  jobs: () => jobViews().map((job) => ({ ...job })),
};
declare global {
  interface Window {
    kiln: typeof hooks;
  }
}
window.kiln = hooks;

export function logEvent(job: ServiceName, kind: string, where: { sequence?: number; jobId?: string } = {}): void {
  hooks.events.push({ job, kind, t: performance.now(), ...where });
}
