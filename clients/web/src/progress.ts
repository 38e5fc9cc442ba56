// Progress bars, the wait and time-left texts, and phase announcements for screen readers.
import { $ } from "./dom.js";
import { formatSeconds } from "./format.js";
import type { Progress } from "./gen/kiln/common/v1/job_pb.js";

export function setBar(bar: HTMLElement, fraction: number, text: string): void {
  const percent = Math.round(Math.min(1, Math.max(0, fraction)) * 100);
  bar.setAttribute("aria-valuenow", String(percent));
  bar.setAttribute("aria-valuetext", text);
  const fill = bar.firstElementChild as HTMLElement | null;
  if (fill) fill.style.width = `${percent}%`;
}

export function etaText(eta: number | undefined): string {
  return eta === undefined ? "" : `about ${formatSeconds(eta)} left`;
}

export function waitText(eta: number | undefined): string {
  return eta === undefined ? "" : `starts in about ${formatSeconds(eta)}`;
}

/** Screen readers hear phase changes (queued, denoising, done), not every step. */
export function announce(region: string, text: string): void {
  const live = $(region);
  if (live.dataset.last !== text) {
    live.dataset.last = text;
    live.textContent = text;
  }
}

export function stepText(progress: Progress): string {
  return progress.totalSteps > 0 ? ` · step ${progress.step} of ${progress.totalSteps}` : "";
}
