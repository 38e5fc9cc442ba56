// API keys for a gateway that checks them. Every call carries `authorization: Bearer <key>` once
// the person has entered a key; when the gateway answers UNAUTHENTICATED (HTTP 401) the page asks
// for one in a dialog that shows the gateway's words, then repeats the call that failed.
//
// The key lives in sessionStorage only: it survives a reload (so running jobs reattach) but not
// the tab, and it is never written to localStorage, a cookie or a URL. A key that the gateway
// refused is dropped at once, so a wrong key is never sent twice. PERMISSION_DENIED (a valid key
// that may not use a service) is not a reason to ask again: the panel shows the gateway's message.
import {
  Code,
  ConnectError,
  createContextKey,
  createContextValues,
  type ContextValues,
  type Interceptor,
} from "@connectrpc/connect";
import { createAsyncIterable } from "@connectrpc/connect/protocol";
import { $, show } from "./dom.js";

const STORAGE_KEY = "kiln.apiKey";

/** Used only where sessionStorage throws (some privacy modes): the key then lasts until a reload. */
let memoryKey: string | undefined;
/** Whether the gateway has asked for a key since the page loaded: the header then offers to enter one. */
let keyWanted = false;
const listeners: (() => void)[] = [];

/**
 * Per call: whether an UNAUTHENTICATED answer may open the key dialog. Background calls (the
 * status pills' GetInfo) pass false, so loading the page never interrupts anyone with a dialog;
 * the first thing the person does asks instead.
 */
export const mayAskForKey = createContextKey<boolean>(true, { description: "open the API key dialog on 401" });

/** Call options for a call that must not open the key dialog (`ask` false); none otherwise. */
export function askOptions(ask: boolean): { contextValues?: ContextValues } {
  return ask ? {} : { contextValues: createContextValues().set(mayAskForKey, false) };
}

/** The key this tab holds, if any. */
export function apiKey(): string | undefined {
  try {
    return sessionStorage.getItem(STORAGE_KEY) ?? undefined;
  } catch {
    return memoryKey;
  }
}

function storeKey(key: string | undefined): void {
  try {
    if (key) sessionStorage.setItem(STORAGE_KEY, key);
    else sessionStorage.removeItem(STORAGE_KEY);
  } catch {
    memoryKey = key;
  }
  updateKeyControls();
  for (const listener of listeners) listener();
}

/** Drops the key this tab holds (the "Forget key" control, or a key the gateway refused). */
export function forgetKey(): void {
  storeKey(undefined);
}

/** Called after the key changes (entered or forgotten): the status pills ask the servers again. */
export function onKeyChange(listener: () => void): void {
  listeners.push(listener);
}

/** The headers a call needs: `authorization` when there is a key, nothing otherwise. */
export function authHeaders(): Record<string, string> {
  const key = apiKey();
  return key ? { authorization: `Bearer ${key}` } : {};
}

/** The gateway said UNAUTHENTICATED: remember that a key is wanted, and drop the key it refused. */
function refused(sentKey: string | undefined): void {
  keyWanted = true;
  if (sentKey !== undefined && apiKey() === sentKey) forgetKey();
  else updateKeyControls();
}

let pending: Promise<boolean> | undefined;

/**
 * Asks for a key with the gateway's message. Resolves true once a key was entered, false when
 * the person cancelled or `signal` aborted. Calls that fail together share one dialog.
 */
export function requestKey(message: string, signal?: AbortSignal): Promise<boolean> {
  pending ??= openDialog(message).finally(() => (pending = undefined));
  if (!signal) return pending;
  if (signal.aborted) return Promise.resolve(false);
  return Promise.race([
    pending,
    new Promise<boolean>((resolve) => signal.addEventListener("abort", () => resolve(false), { once: true })),
  ]);
}

function openDialog(message: string): Promise<boolean> {
  const dialog = $<HTMLDialogElement>("key-dialog");
  const form = $<HTMLFormElement>("key-form");
  const input = $<HTMLInputElement>("key-input");
  $("key-message").textContent = message || "The gateway needs an API key for this.";
  // How often the page has asked (the browser tests read it to tell one dialog from the next).
  dialog.dataset.asked = String(Number(dialog.dataset.asked ?? "0") + 1);
  input.value = "";
  const opener = document.activeElement instanceof HTMLElement ? document.activeElement : undefined;
  return new Promise<boolean>((resolve) => {
    const finish = (entered: boolean) => {
      form.removeEventListener("submit", submit);
      $("key-cancel").removeEventListener("click", cancel);
      dialog.removeEventListener("cancel", cancel);
      input.value = "";
      if (dialog.open) dialog.close();
      opener?.focus();
      resolve(entered);
    };
    const submit = (event: Event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) {
        input.setAttribute("aria-invalid", "true");
        input.focus();
        return;
      }
      input.removeAttribute("aria-invalid");
      storeKey(key);
      finish(true);
    };
    const cancel = (event: Event) => {
      event.preventDefault();
      finish(false);
    };
    form.addEventListener("submit", submit);
    $("key-cancel").addEventListener("click", cancel);
    // Escape closes a modal dialog with a `cancel` event.
    dialog.addEventListener("cancel", cancel);
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
}

/**
 * Adds the key to every gRPC-Web call and, on UNAUTHENTICATED, asks for a key and sends the
 * same request again (a server-streaming request's one message is kept for that, since the
 * transport reads it from a one-shot iterable). A call with a deadline keeps it: time spent in
 * the dialog counts.
 */
export const authInterceptor: Interceptor = (next) => async (req) => {
  const messages: unknown[] = [];
  if (req.stream) for await (const message of req.message) messages.push(message);
  for (;;) {
    const key = apiKey();
    if (key) req.header.set("authorization", `Bearer ${key}`);
    else req.header.delete("authorization");
    try {
      return req.stream ? await next({ ...req, message: createAsyncIterable(messages) as typeof req.message }) : await next(req);
    } catch (error) {
      const failure = ConnectError.from(error);
      if (failure.code !== Code.Unauthenticated) throw error;
      refused(key);
      if (!req.contextValues.get(mayAskForKey) || req.signal.aborted) throw error;
      // Another call may have brought a new key meanwhile; then simply try again with it.
      if (apiKey() === undefined && !(await requestKey(failure.rawMessage, req.signal))) throw error;
    }
  }
};

/** The gateway's words from a plain HTTP error answer (JSON `message`, or the text itself). */
async function answerMessage(response: Response): Promise<string> {
  const text = (await response.text().catch(() => "")).trim();
  try {
    const parsed = JSON.parse(text) as { message?: unknown };
    if (typeof parsed.message === "string") return parsed.message;
  } catch {
    // not JSON: the text itself (Envoy's local replies are plain text)
  }
  return text.slice(0, 300) || `HTTP ${response.status}`;
}

/**
 * `fetch` with the key, for the gateway's REST routes (artifact downloads): on 401 it asks for a
 * key and tries again; 403 becomes PERMISSION_DENIED with the gateway's message.
 */
export async function fetchWithKey(url: string, init: RequestInit & { signal: AbortSignal }): Promise<Response> {
  for (;;) {
    const key = apiKey();
    const response = await fetch(url, { ...init, headers: { ...authHeaders(), ...(init.headers as Record<string, string>) } });
    if (response.status === 403) {
      throw new ConnectError(await answerMessage(response), Code.PermissionDenied);
    }
    if (response.status !== 401) return response;
    const message = await answerMessage(response);
    refused(key);
    if (apiKey() === undefined && !(await requestKey(message, init.signal))) {
      throw new ConnectError(message, Code.Unauthenticated);
    }
  }
}

function updateKeyControls(): void {
  const held = apiKey() !== undefined;
  show($("key-forget"), held);
  show($("key-enter"), !held && keyWanted);
  $("key-state").textContent = held ? "API key set for this tab" : "";
}

export function setUpAuth(): void {
  $("key-forget").addEventListener("click", () => {
    keyWanted = true; // a key was in use: offer to enter another one
    forgetKey();
    $("key-enter").focus();
  });
  $("key-enter").addEventListener("click", () => void requestKey("Enter the API key you were given for this gateway."));
  updateKeyControls();
}
