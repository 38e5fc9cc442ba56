// The two model services over gRPC-Web (binary framing) through the gateway that serves this
// page, so the base URL is the page's own origin and no CORS is involved. Binary, not text
// mode: text costs a third more bytes, and grpcio has no JSON codec for grpc-web+json.
import { createClient, type CallOptions, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { askOptions, authInterceptor } from "./auth.js";
import type { ServiceName } from "./errors.js";
import type { JobStatus } from "./gen/kiln/common/v1/job_pb.js";
import { Img2ImgProvider } from "./gen/kiln/img2img/v1/img2img_service_pb.js";
import { MeshProvider } from "./gen/kiln/mesh/v1/mesh_service_pb.js";

const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  useBinaryFormat: true,
  // The API key (when the gateway wants one) on every call, and the key dialog on a 401.
  interceptors: [authInterceptor],
});

export const img2img: Client<typeof Img2ImgProvider> = createClient(Img2ImgProvider, transport);
export const mesh: Client<typeof MeshProvider> = createClient(MeshProvider, transport);

/**
 * The gateway's session header. With several replicas of a service, Envoy names the replica
 * that answered a Generate in this response header; sending it back on that job's later calls
 * (WatchJob, GetJob, CancelJob) routes them to the replica that runs the job, the only one that
 * sees its live progress. A server without the gateway in front sends none, which is fine.
 */
export const SESSION_HEADER = "x-kiln-session";

/** Call options that route a job's call to its replica (when the page knows it) and stop with `signal`. */
export function jobCallOptions(session: string | undefined, signal?: AbortSignal, timeoutMs?: number): CallOptions {
  return {
    ...(session ? { headers: { [SESSION_HEADER]: session } } : {}),
    ...(signal ? { signal } : {}),
    ...(timeoutMs ? { timeoutMs } : {}),
  };
}

/** What the jobs list needs of either service: a job's status, and cancelling it. */
export interface JobControls {
  /** `ask`: whether a 401 may open the key dialog (false for lookups the person did not start). */
  getJob(jobId: string, session: string | undefined, ask: boolean): Promise<JobStatus | undefined>;
  cancelJob(jobId: string, session: string | undefined): Promise<JobStatus | undefined>;
}

/** A lookup or a cancel answers at once (CancelJob waits for the terminal event: one step at most). */
export const CONTROL_TIMEOUT_MS = 15_000;

export const jobControls: Record<ServiceName, JobControls> = {
  img2img: {
    getJob: async (jobId, session, ask) =>
      (await img2img.getJob({ jobId }, { ...jobCallOptions(session, undefined, CONTROL_TIMEOUT_MS), ...askOptions(ask) })).job?.status,
    cancelJob: async (jobId, session) =>
      (await img2img.cancelJob({ jobId }, jobCallOptions(session, undefined, CONTROL_TIMEOUT_MS))).job?.status,
  },
  mesh: {
    getJob: async (jobId, session, ask) =>
      (await mesh.getJob({ jobId }, { ...jobCallOptions(session, undefined, CONTROL_TIMEOUT_MS), ...askOptions(ask) })).job?.status,
    cancelJob: async (jobId, session) =>
      (await mesh.cancelJob({ jobId }, jobCallOptions(session, undefined, CONTROL_TIMEOUT_MS))).job?.status,
  },
};

/** URL of a stored artifact's download route on the gateway (`GET /v1/artifacts/<job>/<file>`). */
export function artifactUrl(artifactId: string): string {
  return `${location.origin}/v1/artifacts/${artifactId.split("/").map(encodeURIComponent).join("/")}`;
}

/** A fresh idempotency key for one submit (AIP-155); random bytes work on plain http too, unlike randomUUID. */
export function newClientRequestId(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return `web-${Date.now().toString(36)}-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}
