// Test and debugging hooks: `window.kiln` (the browser tests read these; harmless otherwise)
import type { ServiceName } from "./errors.js";
import type { GetInfoResponse as Img2ImgInfo } from "./gen/kiln/img2img/v1/img2img_service_pb.js";
import type { GetInfoResponse as MeshInfo } from "./gen/kiln/mesh/v1/mesh_service_pb.js";
import { viewer } from "./state.js";

interface LoggedEvent {
  job: ServiceName;
  kind: string;
  t: number;
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
};
declare global {
  interface Window {
    kiln: typeof hooks;
  }
}
window.kiln = hooks;

export function logEvent(job: ServiceName, kind: string): void {
  hooks.events.push({ job, kind, t: performance.now() });
}
