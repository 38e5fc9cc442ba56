// A job a panel follows on this page: the switch that stops its stream, this browser's record
// of it (saved cursor, session, state for the jobs list), and cancelling it on the server.
import { jobCallOptions, jobControls, SESSION_HEADER } from "./api.js";
import { describeError, type ServiceName, type UiError } from "./errors.js";
import { JobState, type Progress } from "./gen/kiln/common/v1/job_pb.js";
import { logEvent } from "./hooks.js";
import type { JobHandlers, JobSource } from "./jobs.js";
import { findJob, remember, updateJob, type JobView } from "./myjobs.js";

/**
 * How long a cancelled job's stream may take to deliver its CANCELLED event before the page
 * stops listening anyway (CancelJob returns once that event is recorded, so it is normally at once).
 */
const CANCEL_SETTLE_MS = 10_000;

/** How a panel follows a job: what it shows before the first event, and what Retry does. */
export interface FollowOptions {
  /** The stage text until the first event. */
  starting: string;
  /** Where the bar starts (a reattached job's last known progress). */
  fraction?: number | undefined;
  /**
   * What Retry does after the job itself failed: submit it anew. Absent for a reattached job,
   * whose request (the image) the page does not have. (When only the connection failed, Retry
   * reattaches to the job instead: it may still be running.)
   */
  retry?: () => void;
}

export class FollowedJob {
  readonly controller = new AbortController();
  jobId: string;
  session: string | undefined;
  /** Set when CancelJob failed: the panel shows this instead of "Cancelled". */
  cancelFailure: UiError | undefined;
  private cancelWanted = false;

  constructor(
    readonly service: ServiceName,
    /** The words for a progress event (a stage name), for the jobs list. */
    private readonly describeProgress: (progress: Progress) => string,
    known?: JobView,
  ) {
    this.jobId = known?.id ?? "";
    this.session = known?.session;
    if (known) updateJob(known.id, { followed: true });
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** Options for this job's stream call: its replica's session header, and this run's abort signal. */
  callOptions(): ReturnType<typeof jobCallOptions> {
    return { ...jobCallOptions(this.session, this.signal), onHeader: (headers) => this.readSession(headers) };
  }

  /** Adds this browser's bookkeeping to a panel's handlers: the event log, the saved cursor, the list's state. */
  handlers(panel: JobHandlers): JobHandlers {
    return {
      ...panel,
      any: (kind, sequence, jobId) => {
        logEvent(this.service, kind, { sequence: Number(sequence), jobId });
        if (kind === "accepted" && !this.jobId) this.accepted(jobId, sequence);
        else if (sequence > 0n) updateJob(jobId, { lastSequence: Number(sequence) });
        panel.any?.(kind, sequence, jobId);
      },
      queued: (event) => {
        updateJob(this.jobId, { state: JobState.QUEUED, detail: `Queued · position ${event.position}` });
        panel.queued?.(event);
      },
      progress: (event) => {
        const percent = Math.round(Math.min(1, Math.max(0, event.fraction)) * 100);
        updateJob(this.jobId, {
          state: JobState.RUNNING,
          fraction: event.fraction,
          detail: `${this.describeProgress(event)} · ${percent}%`,
        });
        panel.progress?.(event);
      },
      reconnecting: (attempt, delayMs) => {
        logEvent(this.service, "reconnecting", { sequence: findJob(this.jobId)?.lastSequence ?? 0, jobId: this.jobId });
        panel.reconnecting?.(attempt, delayMs);
      },
    };
  }

  /** The job reached its end (or this page stopped following it: `ui` without a terminal state). */
  ended(state: JobState | undefined, ui?: UiError): void {
    if (!this.jobId) return;
    updateJob(this.jobId, {
      ...(state !== undefined ? { state, fraction: state === JobState.SUCCEEDED ? 1 : undefined } : {}),
      ...(ui ? { detail: ui.title } : state === JobState.SUCCEEDED ? { detail: "Done" } : {}),
    });
  }

  /** The panel is free again (called once it no longer counts as busy). */
  release(): void {
    if (this.jobId) updateJob(this.jobId, { followed: false });
  }

  /**
   * Cancel the job on the server (CancelJob); its stream then ends with the CANCELLED event.
   * Before the job has an id, the cancel waits for it (the `accepted` event comes first and
   * fast). When the server cannot be asked, the page stops listening: a job nobody watches is
   * cancelled by the server after its grace period.
   */
  async cancel(): Promise<void> {
    if (this.signal.aborted) return;
    if (!this.jobId) {
      this.cancelWanted = true;
      setTimeout(() => {
        if (!this.jobId) this.controller.abort();
      }, CANCEL_SETTLE_MS);
      return;
    }
    try {
      await jobControls[this.service].cancelJob(this.jobId, this.session);
      setTimeout(() => this.controller.abort(), CANCEL_SETTLE_MS);
    } catch (error) {
      const ui = describeError(error, this.service);
      this.cancelFailure = {
        ...ui,
        title: `Could not cancel: ${ui.title.charAt(0).toLowerCase()}${ui.title.slice(1)}`,
        hint: `${ui.hint} The page stopped following the job; the server stops it by itself within about a minute once nobody watches it.`,
      };
      this.controller.abort();
    }
  }

  private accepted(jobId: string, sequence: bigint): void {
    this.jobId = jobId;
    const saved = { id: jobId, service: this.service, lastSequence: Number(sequence), created: Date.now() };
    remember(this.session ? { ...saved, session: this.session } : saved, { state: JobState.QUEUED, detail: "Starting", followed: true });
    if (this.cancelWanted) void this.cancel();
  }

  private readSession(headers: Headers): void {
    const session = headers.get(SESSION_HEADER);
    if (!session || session === this.session) return;
    // A new value after a reattach: the gateway sent this job's calls to another replica.
    this.session = session;
    if (this.jobId) updateJob(this.jobId, { session });
  }
}

/** Reattaching a panel to a job this browser started: WatchJob after the saved cursor, again after a break. */
export function reattach<R>(view: JobView, watch: JobSource<R>["resume"]): { source: JobSource<R>; options: FollowOptions } {
  const after = BigInt(view.lastSequence);
  logEvent(view.service, "watch", { sequence: view.lastSequence, jobId: view.id });
  return {
    source: { first: watch(view.id, after), resume: watch, jobId: view.id, after },
    options: { starting: "Reconnecting to the job…", fraction: view.fraction },
  };
}

/**
 * What the alert's Retry does after a failure: reattach when only the connection failed (the job
 * may still run), submit anew when the job itself failed (if the panel can), nothing after a
 * failed cancel (the job stops by itself).
 */
export function retryAfter(
  run: FollowedJob,
  terminal: boolean,
  options: FollowOptions,
  reattachTo: (view: JobView) => void,
): (() => void) | undefined {
  if (run.cancelFailure) return undefined;
  const view = !terminal && run.jobId ? findJob(run.jobId) : undefined;
  if (view) return () => reattachTo(view);
  return options.retry;
}
