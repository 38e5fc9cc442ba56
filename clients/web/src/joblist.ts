// The jobs list: this browser's recent jobs (kind, state, time, progress) with Cancel for queued
// and running ones and Show for finished results. On load it checks every saved job with
// GetJob, quietly drops those the server no longer has, reattaches each panel to its running
// job and shows the newest result; jobs no panel follows are looked up again every few seconds.
import { Code, ConnectError } from "@connectrpc/connect";
import { hideAlert, showAlert } from "./alerts.js";
import { jobControls } from "./api.js";
import { apiKey, onKeyChange } from "./auth.js";
import { $, el, show } from "./dom.js";
import { describeError, describeStatus, type ServiceName, type UiError } from "./errors.js";
import { JobState, type JobStatus } from "./gen/kiln/common/v1/job_pb.js";
import { findJob, forget, isFinished, jobViews, onJobsChange, updateJob, type JobView } from "./myjobs.js";
import { setBar } from "./progress.js";

/** What the list asks of the panel that shows one service's jobs. */
export interface JobPanel {
  /** The panel follows a job now. */
  busy(): boolean;
  /** The finished job whose result the panel shows, if any. */
  shown(): string | undefined;
  /** Follow a queued or running job from its saved cursor; false when busy. */
  resume(view: JobView): boolean;
  /** Show a finished job's stored result. */
  show(jobId: string, session: string | undefined): Promise<void>;
  /** Cancel `jobId` if the panel follows it (so the panel says "Cancelling…"); false otherwise. */
  cancel(jobId: string): boolean;
}

type Panels = Record<ServiceName, JobPanel>;

/** How often jobs that no panel follows are looked up while the page is visible. */
const POLL_MS = 5_000;

const STATE_LABELS: Record<JobState, string> = {
  [JobState.UNSPECIFIED]: "Checking…",
  [JobState.QUEUED]: "Queued",
  [JobState.RUNNING]: "Running",
  [JobState.SUCCEEDED]: "Done",
  [JobState.FAILED]: "Failed",
  [JobState.CANCELLED]: "Cancelled",
};
const STATE_NAMES: Record<JobState, string> = {
  [JobState.UNSPECIFIED]: "unknown",
  [JobState.QUEUED]: "queued",
  [JobState.RUNNING]: "running",
  [JobState.SUCCEEDED]: "succeeded",
  [JobState.FAILED]: "failed",
  [JobState.CANCELLED]: "cancelled",
};
const SERVICE_LABELS: Record<ServiceName, string> = { img2img: "Image", mesh: "3D" };

let panels: Panels;
const rows = new Map<string, HTMLLIElement>();
/** Jobs with a CancelJob in flight from this list. */
const cancelling = new Set<string>();

/** What a GetJob or CancelJob answer says about a job, in the list's terms. */
function applyStatus(view: JobView, status: JobStatus): void {
  const percent = (fraction: number) => `${Math.round(Math.min(1, Math.max(0, fraction)) * 100)}%`;
  let detail = "";
  if (status.state === JobState.QUEUED) detail = status.queuePosition > 0 ? `Queued · position ${status.queuePosition}` : "Starting";
  else if (status.state === JobState.RUNNING) detail = status.progress ? `Running · ${percent(status.progress.fraction)}` : "Starting";
  else if (status.state === JobState.SUCCEEDED) detail = "Done";
  else if (status.error) detail = describeStatus(status.error, view.service).title;
  updateJob(view.id, {
    state: status.state,
    detail,
    fraction: status.state === JobState.SUCCEEDED ? 1 : status.progress?.fraction,
  });
}

/** True for an answer meaning "the server has no such job": expired, or never its. */
function isGone(error: unknown): boolean {
  const code = ConnectError.from(error).code;
  // A malformed id (INVALID_ARGUMENT naming job_id) can only be a damaged saved entry.
  return code === Code.NotFound || code === Code.InvalidArgument;
}

/**
 * Looks a job up; drops it when the server no longer has it. Returns a failure to report, if any.
 * `ask`: whether a 401 may open the key dialog (not for the lookups on load and in the background).
 */
async function check(view: JobView, ask = false): Promise<UiError | undefined> {
  try {
    const status = await jobControls[view.service].getJob(view.id, view.session, ask);
    if (status) applyStatus(view, status);
    else forget(view.id);
    return undefined;
  } catch (error) {
    if (isGone(error)) {
      forget(view.id);
      return undefined;
    }
    const ui = describeError(error, view.service);
    updateJob(view.id, { detail: `Could not check: ${ui.title}` });
    return ui;
  }
}

function reportCheckFailure(failure: UiError, service: ServiceName, retry: () => void): void {
  showAlert($("jobs-alert"), service, { ...failure, title: `Could not look up your jobs: ${failure.title}` }, retry);
}

/**
 * After a load: check every saved job, then put each panel back where its jobs are: follow the
 * newest queued or running one, or else show the newest finished result.
 */
async function restore(ask = false): Promise<void> {
  hideAlert($("jobs-alert"));
  const views = [...jobViews()];
  const failures = await Promise.all(views.map((view) => check(view, ask)));
  const failed = failures.findIndex((ui) => ui !== undefined);
  const failure = failures[failed];
  const failedView = views[failed];
  // Retry is the person's own action: then a gateway that wants a key may ask for one.
  if (failure && failedView) reportCheckFailure(failure, failedView.service, () => void restore(true));
  const shown = (["img2img", "mesh"] as const).map(async (service) => {
    const panel = panels[service];
    if (panel.busy()) return;
    const mine = jobViews().filter((view) => view.service === service);
    const live = mine.find((view) => view.state === JobState.QUEUED || view.state === JobState.RUNNING);
    if (live) {
      panel.resume(live);
      return;
    }
    const done = mine.find((view) => view.state === JobState.SUCCEEDED);
    if (done) await panel.show(done.id, done.session);
  });
  await Promise.all(shown);
  render();
}

/** Looks up the unfinished jobs no panel follows (started in another tab, or left behind). */
async function poll(): Promise<void> {
  const stale = jobViews().filter((view) => !view.followed && !isFinished(view.state) && !cancelling.has(view.id));
  await Promise.all(stale.map((view) => check(view)));
}

async function cancel(view: JobView): Promise<void> {
  if (panels[view.service].cancel(view.id)) return; // the panel follows it and says what happens
  hideAlert($("jobs-alert"));
  cancelling.add(view.id);
  updateJob(view.id, { detail: "Cancelling…" });
  try {
    const status = await jobControls[view.service].cancelJob(view.id, view.session);
    if (status) applyStatus(view, status);
  } catch (error) {
    if (isGone(error)) forget(view.id);
    else {
      const ui = describeError(error, view.service);
      updateJob(view.id, { detail: `Not cancelled: ${ui.title}` });
      showAlert($("jobs-alert"), view.service, { ...ui, title: `Could not cancel the job: ${ui.title}` }, () => void cancel(view));
    }
  } finally {
    cancelling.delete(view.id);
    render();
  }
}

function timeText(created: number): string {
  const at = new Date(created);
  const today = at.toDateString() === new Date().toDateString();
  return today
    ? at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : at.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function button(action: "cancel" | "show", label: string, aria: string): HTMLButtonElement {
  const b = el("button", action === "cancel" ? "btn small danger" : "btn small", label);
  b.type = "button";
  b.dataset.action = action;
  b.setAttribute("aria-label", aria);
  return b;
}

function newRow(view: JobView): HTMLLIElement {
  const row = el("li", "job-row");
  row.dataset.job = view.id;
  row.dataset.service = view.service;
  row.title = `job ${view.id}`;
  const bar = el("span", "bar small");
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-label", `Progress of job ${view.id}`);
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  bar.append(el("span", "bar-fill"));
  const time = el("time", "job-time muted", timeText(view.created));
  time.dateTime = new Date(view.created).toISOString();
  const kind = SERVICE_LABELS[view.service];
  row.append(
    el("span", "job-service", kind),
    el("span", "job-state"),
    el("span", "job-detail muted"),
    time,
    bar,
    el("code", "job-id muted", `…${view.id.slice(-6)}`),
    button("cancel", "Cancel", `Cancel the ${kind.toLowerCase()} job ${view.id}`),
    button("show", "Show", `Show the result of job ${view.id}`),
  );
  return row;
}

function part<T extends HTMLElement = HTMLElement>(row: HTMLElement, selector: string): T {
  const found = row.querySelector<T>(selector);
  if (!found) throw new Error(`a job row has no ${selector}`);
  return found;
}

/** Brings the rows in line with the jobs, updating rows in place so a click is never lost to a redraw. */
function render(): void {
  const list = $("jobs-list");
  const views = jobViews();
  const wanted = new Set(views.map((view) => view.id));
  for (const [id, row] of rows) {
    if (!wanted.has(id)) {
      row.remove();
      rows.delete(id);
    }
  }
  let previous: HTMLLIElement | undefined;
  for (const view of views) {
    let row = rows.get(view.id);
    if (!row) {
      row = newRow(view);
      rows.set(view.id, row);
    }
    if (previous ? previous.nextSibling !== row : list.firstChild !== row) {
      if (previous) previous.after(row);
      else list.prepend(row);
    }
    previous = row;
    const name = STATE_NAMES[view.state];
    row.dataset.state = name;
    // Unspecified with a detail: the lookup failed, so the state is unknown rather than coming.
    const unknown = view.state === JobState.UNSPECIFIED && view.detail !== "";
    part(row, ".job-state").textContent = unknown ? "Unknown" : STATE_LABELS[view.state];
    part(row, ".job-detail").textContent = view.detail === STATE_LABELS[view.state] ? "" : view.detail;
    const live = view.state === JobState.QUEUED || view.state === JobState.RUNNING;
    const bar = part(row, ".bar");
    show(bar, live);
    if (live) setBar(bar, view.fraction ?? 0, view.detail || STATE_LABELS[view.state]);
    const cancelButton = part<HTMLButtonElement>(row, '[data-action="cancel"]');
    show(cancelButton, live);
    cancelButton.disabled = cancelling.has(view.id);
    const showButton = part<HTMLButtonElement>(row, '[data-action="show"]');
    show(showButton, view.state === JobState.SUCCEEDED && !view.followed && panels[view.service].shown() !== view.id);
    showButton.disabled = panels[view.service].busy();
  }
  show($("jobs-panel"), views.length > 0);
}

export function setUpJobList(forPanels: Panels): void {
  panels = forPanels;
  onJobsChange(render);
  $("jobs-list").addEventListener("click", (event) => {
    const target = (event.target as HTMLElement).closest<HTMLButtonElement>("button[data-action]");
    const id = target?.closest<HTMLElement>(".job-row")?.dataset.job;
    const view = id ? findJob(id) : undefined;
    if (!target || !view) return;
    if (target.dataset.action === "cancel") void cancel(view);
    else void panels[view.service].show(view.id, view.session).then(render);
  });
  render();
  void restore();
  // Jobs that could not be looked up for want of a key come back once one is entered.
  onKeyChange(() => {
    if (apiKey() && $("jobs-alert").dataset.code === "UNAUTHENTICATED") void restore();
  });
  window.setInterval(() => {
    if (document.visibilityState === "visible") void poll();
  }, POLL_MS);
}
