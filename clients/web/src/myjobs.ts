// This browser's jobs: a short list kept in localStorage, so that after a reload (or in a tab
// opened later) the page finds its running jobs again and can show the finished ones; plus what
// the page has learnt about each job since it loaded (state, progress), for the jobs list.
import type { ServiceName } from "./errors.js";
import { JobState } from "./gen/kiln/common/v1/job_pb.js";

/** What is kept across reloads: enough to look a job up, reattach to it and route to its replica. */
export interface SavedJob {
  id: string;
  service: ServiceName;
  /** The gateway's session value from the Generate response (`x-kiln-session`), if there was one. */
  session?: string;
  /** Sequence of the last event this browser handled: WatchJob resumes after it. */
  lastSequence: number;
  /** When the job was accepted, in ms since the epoch. */
  created: number;
}

/** A job as the page shows it: the saved part plus the latest state the page knows. */
export interface JobView extends SavedJob {
  /** UNSPECIFIED until the server has said (a GetJob after a reload, or the job's first event). */
  state: JobState;
  /** Whole-job completion in [0, 1] while it runs. */
  fraction?: number;
  /** A few words on where it is: "Queued · position 2", "Denoising · step 3 of 18", an error title. */
  detail: string;
  /** A panel follows this job's events on this page now. */
  followed: boolean;
}

const KEY = "kiln.jobs.v1";
/** Enough to come back to what one did recently, small enough to check every one after a reload. */
export const MAX_SAVED_JOBS = 20;

export function isFinished(state: JobState): boolean {
  return state === JobState.SUCCEEDED || state === JobState.FAILED || state === JobState.CANCELLED;
}

function isSaved(value: unknown): value is SavedJob {
  const job = value as Partial<SavedJob> | null;
  return (
    typeof job === "object" &&
    job !== null &&
    typeof job.id === "string" &&
    (job.service === "img2img" || job.service === "mesh") &&
    typeof job.lastSequence === "number" &&
    typeof job.created === "number" &&
    (job.session === undefined || typeof job.session === "string")
  );
}

function load(): SavedJob[] {
  try {
    const parsed: unknown = JSON.parse(localStorage.getItem(KEY) ?? "[]");
    return Array.isArray(parsed) ? parsed.filter(isSaved).slice(0, MAX_SAVED_JOBS) : [];
  } catch {
    // No storage (a privacy mode) or a damaged entry: start afresh rather than break the page.
    return [];
  }
}

const views: JobView[] = [];
/** Jobs this page dropped: another tab's copy of the list must not bring them back. */
const forgotten = new Set<string>();
const listeners: (() => void)[] = [];

/**
 * Takes in what another tab of this browser saved: its new jobs, and cursors further on than
 * this page's. Returns whether anything changed here.
 */
function merge(stored: SavedJob[]): boolean {
  let changedHere = false;
  for (const saved of stored) {
    if (forgotten.has(saved.id)) continue;
    const view = views.find((v) => v.id === saved.id);
    if (!view) {
      views.push({ ...saved, state: JobState.UNSPECIFIED, detail: "", followed: false });
      changedHere = true;
    } else if (saved.lastSequence > view.lastSequence && !view.followed) {
      view.lastSequence = saved.lastSequence;
      changedHere = true;
    }
  }
  if (changedHere) {
    views.sort((a, b) => b.created - a.created);
    views.splice(MAX_SAVED_JOBS);
  }
  return changedHere;
}

function persist(): void {
  // Several tabs share the list: keep what the others added since this page last looked.
  merge(load());
  const saved: SavedJob[] = views.map(({ id, service, session, lastSequence, created }) => ({
    id,
    service,
    ...(session ? { session } : {}),
    lastSequence,
    created,
  }));
  try {
    localStorage.setItem(KEY, JSON.stringify(saved));
  } catch {
    // Storage full or refused: the page still works, it just forgets these jobs on reload.
  }
}

merge(load());
window.addEventListener("storage", (event) => {
  if (event.key === KEY && merge(load())) changed();
});

function changed(): void {
  for (const listener of listeners) listener();
}

/** Newest first. */
export function jobViews(): readonly JobView[] {
  return views;
}

export function findJob(id: string): JobView | undefined {
  return views.find((view) => view.id === id);
}

export function onJobsChange(listener: () => void): void {
  listeners.push(listener);
}

/** Tells the listeners to look again (a panel now shows another job's result). */
export function jobsShownChanged(): void {
  changed();
}

/** Adds a job this page just submitted (or updates it), newest first; the oldest beyond the bound go. */
export function remember(saved: SavedJob, view: Partial<JobView> = {}): void {
  const existing = views.findIndex((v) => v.id === saved.id);
  const previous = existing >= 0 ? views.splice(existing, 1)[0] : undefined;
  views.unshift({ state: JobState.UNSPECIFIED, detail: "", followed: false, ...previous, ...saved, ...view });
  views.sort((a, b) => b.created - a.created);
  views.splice(MAX_SAVED_JOBS);
  persist();
  changed();
}

/** Updates what the page knows of a job; saved only when a saved field changed. */
export function updateJob(id: string, patch: Partial<Omit<JobView, "id" | "service">>): void {
  const view = views.find((v) => v.id === id);
  if (!view) return;
  const before = [view.session, view.lastSequence, view.created];
  Object.assign(view, patch);
  if (view.session !== before[0] || view.lastSequence !== before[1] || view.created !== before[2]) persist();
  changed();
}

/** Drops a job the server no longer has (expired, or never known to it). */
export function forget(id: string): void {
  forgotten.add(id);
  const at = views.findIndex((v) => v.id === id);
  if (at < 0) return;
  views.splice(at, 1);
  persist();
  changed();
}
