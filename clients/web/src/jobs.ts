// Consuming a job's event stream (Generate, or WatchJob to reattach; img2img and mesh share the
// event envelope): hands each event to the page as it arrives, resumes with WatchJob from the
// last sequence when the connection breaks, reassembles chunked artifacts, fetches referenced
// ones, and checks every file against the SHA-256 the result carries.
import { Code, ConnectError } from "@connectrpc/connect";
import { artifactUrl } from "./api.js";
import { fetchWithKey } from "./auth.js";
import { ClientError, describeStatus, type ServiceName, type UiError } from "./errors.js";
import type { Status } from "./gen/google/rpc/status_pb.js";
import type { Artifact, ArtifactChunk } from "./gen/kiln/common/v1/artifact_pb.js";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import type { Accepted, JobStatus, Progress, Queued } from "./gen/kiln/common/v1/job_pb.js";

/** The oneof both services' GenerateResponse carry; only the result type differs. */
export type JobEvent<R> =
  | { case: "accepted"; value: Accepted }
  | { case: "queued"; value: Queued }
  | { case: "progress"; value: Progress }
  | { case: "chunk"; value: ArtifactChunk }
  | { case: "result"; value: R }
  | { case: "error"; value: Status }
  | { case: undefined; value?: undefined };

/** One message of a Generate or WatchJob stream. */
export interface JobMessage<R> {
  event: JobEvent<R>;
  /** The event's place in its job (1 = accepted); 0 from a server older than sequences. */
  sequence: bigint;
}

export type JobStream<R> = AsyncIterable<JobMessage<R>>;

/** Where a job's events come from. */
export interface JobSource<R> {
  /** The first stream: Generate for a new job, or WatchJob for a job the page already knew. */
  first: JobStream<R>;
  /** A WatchJob stream of the events after `after`, to replace a stream that broke. */
  resume(jobId: string, after: bigint): JobStream<R>;
  /** The job's id when `first` reattaches to a known job. */
  jobId?: string;
  /** The sequence `first` starts after (a reattaching WatchJob's cursor); 0 for a new job. */
  after?: bigint;
}

export interface JobHandlers {
  accepted?(event: Accepted): void;
  queued?(event: Queued): void;
  progress?(event: Progress): void;
  /** After each chunk: bytes of artifacts received so far in this stream. */
  chunk?(event: ArtifactChunk, bytesSoFar: number): void;
  /** Every event, with its sequence and job id: the event log and the saved cursor. */
  any?(kind: string, sequence: bigint, jobId: string): void;
  /** The stream broke; the page tries again (WatchJob) after `delayMs`. */
  reconnecting?(attempt: number, delayMs: number): void;
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

/** Thrown when the stream carried an in-band `error` event (the job's terminal event). */
export class StreamError extends Error {
  constructor(readonly ui: UiError) {
    super(ui.message);
  }
}

/**
 * Waits before each new WatchJob after a break: about half a minute in all, well inside the
 * server's grace period (60 s by default) during which a job nobody watches keeps running.
 */
const RESUME_DELAYS_MS = [500, 1000, 2000, 4000, 8000, 8000, 8000];

/**
 * Collects `chunk` events per artifact id. Strict for a stream seen from its start: offsets must
 * be contiguous. After a reattach or a gap in the sequence some chunks were never seen here (or
 * were dropped from a finished job's retained events): then an incomplete artifact is left out
 * and fetched by reference instead.
 */
class ChunkCollector {
  private readonly parts = new Map<string, { chunks: Uint8Array[]; next: bigint; last: boolean; broken: boolean }>();
  received = 0;
  lenient = false;

  add(chunk: ArtifactChunk): void {
    const entry = this.parts.get(chunk.artifactId) ?? { chunks: [], next: 0n, last: false, broken: false };
    this.parts.set(chunk.artifactId, entry);
    if (chunk.offset !== entry.next) {
      if (!this.lenient) {
        throw new ClientError(`chunk of ${chunk.artifactId} at offset ${chunk.offset}, expected ${entry.next}`);
      }
      entry.broken = true;
    }
    if (entry.broken) return;
    entry.chunks.push(chunk.data);
    entry.next += BigInt(chunk.data.length);
    entry.last ||= chunk.last;
    this.received += chunk.data.length;
  }

  take(artifactId: string): Uint8Array<ArrayBuffer> | undefined {
    const entry = this.parts.get(artifactId);
    if (!entry) return undefined;
    if (!entry.last || entry.broken) {
      if (this.lenient) return undefined;
      throw new ClientError(`the last chunk of ${artifactId} never arrived`);
    }
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

/**
 * The artifact's signed link when it points at this page's own origin: it needs no key, and the
 * page's Content-Security-Policy (`connect-src 'self'`) lets it be fetched. Anything else (no
 * link, a `file://` URI, another host) is downloaded by id with the key instead.
 */
function signedLink(uri: string): string | undefined {
  if (!uri) return undefined;
  try {
    const url = new URL(uri, location.href);
    return url.origin === location.origin && url.searchParams.has("signature") ? url.href : undefined;
  } catch {
    return undefined;
  }
}

async function fetchArtifact(artifact: Artifact, signal: AbortSignal): Promise<Uint8Array<ArrayBuffer>> {
  const link = signedLink(artifact.uri);
  let response = link ? await fetch(link, { signal }) : undefined;
  // An expired link (a result looked at long after GetJob) is refused with 403: the key still works.
  if (!response?.ok) response = await fetchWithKey(artifactUrl(artifact.id), { signal });
  if (response.status === 404) {
    // Removed by the server's retention cleanup (or never kept): only running it again helps.
    throw new ClientError(`${artifact.id} is no longer stored on the server`, Code.NotFound);
  }
  if (!response.ok) {
    throw new ClientError(`downloading ${artifact.id} failed: HTTP ${response.status}`, Code.Unavailable);
  }
  return new Uint8Array(await response.arrayBuffer());
}

/**
 * A result's files, checked: inline bytes, reassembled chunks, or a download by reference (a
 * result from GetJob, or one whose chunks this page did not see, carries only references).
 */
export async function artifactFiles(
  artifacts: Artifact[],
  signal: AbortSignal,
  chunks?: { take(artifactId: string): Uint8Array<ArrayBuffer> | undefined },
): Promise<ArtifactFile[]> {
  const files: ArtifactFile[] = [];
  for (const artifact of artifacts) {
    let bytes: Uint8Array<ArrayBuffer>;
    if (artifact.inlineData.length) bytes = new Uint8Array(artifact.inlineData);
    else bytes = chunks?.take(artifact.id) ?? (await fetchArtifact(artifact, signal));
    const integrity = await checkIntegrity(artifact, bytes);
    files.push({ artifact, bytes, integrity, blob: new Blob([bytes], { type: artifact.mediaType }) });
  }
  return files;
}

/** Seconds from a job's acceptance to its end, for a finished job's "Time" (0 when unknown). */
export function jobSeconds(status: JobStatus | undefined): number {
  if (!status?.createTime || !status.endTime) return 0;
  return (timestampMs(status.endTime) - timestampMs(status.createTime)) / 1000;
}

/**
 * Whether a failed stream is worth reattaching to: the connection broke (the network, a gateway
 * restart), as opposed to an answer. A server reports a job's own failure as its `error` event
 * first, so a bare status without one means the transport; UNAVAILABLE also covers a replica
 * that is gone, where the gateway routes the WatchJob to one that answers from the store.
 */
function isBreak(error: unknown): boolean {
  if (error instanceof ClientError) return error.code === Code.Unknown; // the stream ended early
  const code = ConnectError.from(error).code;
  return code === Code.Unavailable || code === Code.Unknown || code === Code.Internal || code === Code.Aborted;
}

function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const stop = () => {
      clearTimeout(timer);
      reject(new ConnectError("cancelled while reconnecting", Code.Canceled));
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", stop);
      resolve();
    }, ms);
    if (signal.aborted) stop();
    else signal.addEventListener("abort", stop, { once: true });
  });
}

/**
 * Follow a job to its end.
 *
 * Each event is handled once, in sequence order: when a stream breaks after the job was
 * accepted, a WatchJob from the last sequence continues it (events at or below the cursor are
 * skipped). Resolves with the result and its files (bytes checked), or rejects with what the
 * call threw (a ConnectError: cancelled, invalid input, busy, ...), a ClientError for damaged
 * bytes, or a StreamError when the job ended with an `error` event.
 */
export async function runJob<R extends { artifacts: Artifact[] }>(
  source: JobSource<R>,
  service: ServiceName,
  handlers: JobHandlers,
  signal: AbortSignal,
): Promise<JobOutcome<R>> {
  const chunks = new ChunkCollector();
  let jobId = source.jobId ?? "";
  let last = source.after ?? 0n;
  // Reattached: the events up to the cursor (chunks among them) went to an earlier page.
  chunks.lenient = last > 0n;
  let result: R | undefined;
  let failure: Status | undefined;
  let stream = source.first;
  let attempt = 0;
  for (;;) {
    try {
      for await (const { event, sequence } of stream) {
        if (sequence > 0n) {
          if (sequence <= last) continue; // already handled before the stream was replaced
          if (last > 0n && sequence !== last + 1n) chunks.lenient = true; // a finished job's events were compacted
          last = sequence;
        }
        attempt = 0;
        if (event.case === "accepted") jobId = event.value.jobId;
        if (event.case) handlers.any?.(event.case, sequence, jobId);
        switch (event.case) {
          case "accepted":
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
            // The call ends with the same status right after; this explains it with its details.
            failure = event.value;
            break;
          default:
            break; // a newer server's event this page does not know: ignore it
        }
      }
      if (failure) throw new StreamError(describeStatus(failure, service));
      if (!result) throw new ClientError("the stream ended without a result", Code.Unknown);
      break;
    } catch (error) {
      if (failure) throw new StreamError(describeStatus(failure, service));
      if (result) break; // the result is the job's last event: only the closing status went missing
      const delay = RESUME_DELAYS_MS[attempt];
      if (!jobId || signal.aborted || delay === undefined || !isBreak(error)) throw error;
      attempt += 1;
      handlers.reconnecting?.(attempt, delay);
      await pause(delay, signal);
      // The replacement starts after the last event handled, so nothing repeats and nothing is lost.
      stream = source.resume(jobId, last);
      chunks.lenient = true;
    }
  }
  if (!result) throw new ClientError("the stream ended without a result", Code.Unknown);
  return { jobId, result, files: await artifactFiles(result.artifacts, signal, chunks) };
}
