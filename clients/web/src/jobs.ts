// Consuming a Generate stream (img2img and mesh share the event envelope): hands each event to
// the page as it arrives, reassembles chunked artifacts, fetches referenced ones, and checks
// every file against the SHA-256 the result carries.
import type { Status } from "./gen/google/rpc/status_pb.js";
import type { Artifact, ArtifactChunk } from "./gen/kiln/common/v1/artifact_pb.js";
import type { Accepted, Progress, Queued } from "./gen/kiln/common/v1/job_pb.js";
import { artifactUrl } from "./api.js";
import { ClientError, describeStatus, type ServiceName, type UiError } from "./errors.js";
import { Code } from "@connectrpc/connect";

/** The oneof both services' GenerateResponse carry; only the result type differs. */
export type JobEvent<R> =
  | { case: "accepted"; value: Accepted }
  | { case: "queued"; value: Queued }
  | { case: "progress"; value: Progress }
  | { case: "chunk"; value: ArtifactChunk }
  | { case: "result"; value: R }
  | { case: "error"; value: Status }
  | { case: undefined; value?: undefined };

export interface JobHandlers {
  accepted?(event: Accepted): void;
  queued?(event: Queued): void;
  progress?(event: Progress): void;
  /** After each chunk: bytes of artifacts received so far in this stream. */
  chunk?(event: ArtifactChunk, bytesSoFar: number): void;
  /** Every event, for the page's event log (`window.kiln.events`). */
  any?(kind: string): void;
}

export type Integrity = "verified" | "unverified";

export interface ArtifactFile {
  artifact: Artifact;
  bytes: Uint8Array<ArrayBuffer>;
  /** "unverified" only where the browser has no SubtleCrypto (a plain-HTTP, non-local origin). */
  integrity: Integrity;
  blob: Blob;
}

export interface JobOutcome<R> {
  jobId: string;
  result: R;
  files: ArtifactFile[];
}

/** Thrown when the stream carried an in-band `error` event but then ended without a status. */
export class StreamError extends Error {
  constructor(readonly ui: UiError) {
    super(ui.message);
  }
}

/** Collects `chunk` events per artifact id, insisting on contiguous offsets. */
class ChunkCollector {
  private readonly parts = new Map<string, { chunks: Uint8Array[]; next: bigint; last: boolean }>();
  received = 0;

  add(chunk: ArtifactChunk): void {
    const entry = this.parts.get(chunk.artifactId) ?? { chunks: [], next: 0n, last: false };
    if (chunk.offset !== entry.next) {
      throw new ClientError(`chunk of ${chunk.artifactId} at offset ${chunk.offset}, expected ${entry.next}`);
    }
    entry.chunks.push(chunk.data);
    entry.next += BigInt(chunk.data.length);
    entry.last ||= chunk.last;
    this.received += chunk.data.length;
    this.parts.set(chunk.artifactId, entry);
  }

  take(artifactId: string): Uint8Array<ArrayBuffer> | undefined {
    const entry = this.parts.get(artifactId);
    if (!entry) return undefined;
    if (!entry.last) throw new ClientError(`the last chunk of ${artifactId} never arrived`);
    return concat(entry.chunks, Number(entry.next));
  }
}

function concat(chunks: Uint8Array[], length: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(length);
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  return out;
}

function hex(buffer: ArrayBuffer): string {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function checkIntegrity(artifact: Artifact, bytes: Uint8Array<ArrayBuffer>): Promise<Integrity> {
  if (BigInt(bytes.length) !== artifact.sizeBytes) {
    throw new ClientError(`${artifact.id}: received ${bytes.length} bytes, expected ${artifact.sizeBytes}`);
  }
  // SubtleCrypto exists only in secure contexts (https, or http on localhost/127.0.0.1).
  if (!globalThis.crypto?.subtle || !artifact.sha256) return "unverified";
  const digest = hex(await crypto.subtle.digest("SHA-256", bytes));
  if (digest !== artifact.sha256.toLowerCase()) {
    throw new ClientError(`${artifact.id}: SHA-256 ${digest} does not match ${artifact.sha256}`);
  }
  return "verified";
}

async function fetchArtifact(artifact: Artifact, signal: AbortSignal): Promise<Uint8Array<ArrayBuffer>> {
  const response = await fetch(artifactUrl(artifact.id), { signal });
  if (!response.ok) {
    throw new ClientError(`downloading ${artifact.id} failed: HTTP ${response.status}`, Code.Unavailable);
  }
  return new Uint8Array(await response.arrayBuffer());
}

/**
 * Read a Generate stream to its end.
 *
 * Resolves with the result and its files (bytes checked), or rejects with what the call threw
 * (a ConnectError: cancelled, invalid input, busy, ...), a ClientError for damaged bytes, or a
 * StreamError when only an in-band `error` event explains the failure.
 */
export async function runJob<R extends { artifacts: Artifact[] }>(
  stream: AsyncIterable<{ event: JobEvent<R> }>,
  service: ServiceName,
  handlers: JobHandlers,
  signal: AbortSignal,
): Promise<JobOutcome<R>> {
  const chunks = new ChunkCollector();
  let jobId = "";
  let result: R | undefined;
  let failure: Status | undefined;
  for await (const { event } of stream) {
    if (event.case) handlers.any?.(event.case);
    switch (event.case) {
      case "accepted":
        jobId = event.value.jobId;
        handlers.accepted?.(event.value);
        break;
      case "queued":
        handlers.queued?.(event.value);
        break;
      case "progress":
        handlers.progress?.(event.value);
        break;
      case "chunk":
        chunks.add(event.value);
        handlers.chunk?.(event.value, chunks.received);
        break;
      case "result":
        result = event.value;
        break;
      case "error":
        // The call ends with the same status right after; if it does not, this explains why.
        failure = event.value;
        break;
      default:
        break; // a newer server's event this page does not know: ignore it
    }
  }
  if (failure) throw new StreamError(describeStatus(failure, service));
  if (!result) throw new ClientError("the stream ended without a result", Code.Unknown);
  const files: ArtifactFile[] = [];
  for (const artifact of result.artifacts) {
    let bytes: Uint8Array<ArrayBuffer>;
    if (artifact.inlineData.length) bytes = new Uint8Array(artifact.inlineData);
    else bytes = chunks.take(artifact.id) ?? (await fetchArtifact(artifact, signal));
    const integrity = await checkIntegrity(artifact, bytes);
    files.push({ artifact, bytes, integrity, blob: new Blob([bytes], { type: artifact.mediaType }) });
  }
  return { jobId, result, files };
}
