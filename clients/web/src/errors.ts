// Turns gRPC failures (thrown ConnectErrors, or an in-band `error` event) into messages a
// person can act on: what happened, what to do, and which form fields are wrong.
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import type { Any } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
  type BadRequest,
  type ErrorInfo,
  type RetryInfo,
} from "./gen/google/rpc/error_details_pb.js";
import type { Status } from "./gen/google/rpc/status_pb.js";
import { seconds } from "./format.js";

export type ServiceName = "img2img" | "mesh";

export interface FieldProblem {
  /** The request field the server named, e.g. `image` or `num_inference_steps`. */
  field: string;
  /** The server's description, phrased to follow the field's name ("is 32x32; …"). */
  description: string;
}

/** Everything the page needs to show one failure. */
export interface UiError {
  kind: "error" | "cancelled" | "busy";
  code: Code;
  /** gRPC status name, e.g. `INVALID_ARGUMENT`. */
  status: string;
  title: string;
  /** The server's own message (or the transport's), shown verbatim. */
  message: string;
  /** What to do about it. */
  hint: string;
  fields: FieldProblem[];
  /** From google.rpc.RetryInfo: seconds to wait before retrying. */
  retryAfterS?: number;
  /** From google.rpc.ErrorInfo: the machine-readable reason, e.g. `CAPACITY`. */
  reason?: string;
  /** From ErrorInfo metadata: the id to quote when reporting a server failure. */
  requestId?: string;
}

const STATUS_NAMES: Record<number, string> = {
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

interface Details {
  badRequests: BadRequest[];
  retryInfo?: RetryInfo;
  errorInfo?: ErrorInfo;
}

/** A failure the page itself detected (a damaged download, a stream that ended early). */
export class ClientError extends Error {
  constructor(
    message: string,
    readonly code: Code = Code.DataLoss,
  ) {
    super(message);
  }
}

/** Describe anything a call threw. */
export function describeError(reason: unknown, service: ServiceName): UiError {
  if (reason instanceof ClientError) {
    return build(reason.code, reason.message, { badRequests: [] }, service);
  }
  const error = ConnectError.from(reason);
  const details: Details = {
    badRequests: error.findDetails(BadRequestSchema),
    retryInfo: error.findDetails(RetryInfoSchema)[0],
    errorInfo: error.findDetails(ErrorInfoSchema)[0],
  };
  return build(error.code, error.rawMessage, details, service);
}

/** Describe the in-band `error` event (a google.rpc.Status) of a Generate stream. */
export function describeStatus(status: Status, service: ServiceName): UiError {
  const anys: Any[] = status.details;
  const details: Details = {
    badRequests: anys.map((any) => anyUnpack(any, BadRequestSchema)).filter((m) => m !== undefined),
    retryInfo: anys.map((any) => anyUnpack(any, RetryInfoSchema)).find((m) => m !== undefined),
    errorInfo: anys.map((any) => anyUnpack(any, ErrorInfoSchema)).find((m) => m !== undefined),
  };
  return build(status.code as Code, status.message, details, service);
}

function build(code: Code, message: string, details: Details, service: ServiceName): UiError {
  const fields = details.badRequests.flatMap((bad) =>
    bad.fieldViolations.map((v) => ({ field: v.field, description: v.description })),
  );
  const reason = details.errorInfo?.reason || undefined;
  const requestId = details.errorInfo?.metadata["request_id"] || undefined;
  const retryAfterS = seconds(details.retryInfo?.retryDelay);
  const base: UiError = {
    kind: "error",
    code,
    status: STATUS_NAMES[code] ?? String(code),
    title: "",
    message,
    hint: "",
    fields,
    ...(reason ? { reason } : {}),
    ...(requestId ? { requestId } : {}),
    ...(retryAfterS !== undefined ? { retryAfterS } : {}),
  };
  const server = service === "img2img" ? "image server" : "3D server";
  if ((code === Code.Unknown || code === Code.Unavailable) && /failed to fetch|network ?error|load failed/i.test(message)) {
    // fetch itself failed: nothing answered at all (the gateway is down, or the network is).
    return {
      ...base,
      title: "Can't reach the gateway",
      hint: `Nothing answered at ${location.origin}. Check that the gateway is running, then try again.`,
    };
  }
  switch (code) {
    case Code.Canceled:
      return { ...base, kind: "cancelled", title: "Cancelled", hint: "Nothing was kept. Start again whenever you like." };
    case Code.InvalidArgument:
      return {
        ...base,
        title: fields.length ? "Some settings need a change" : "The server could not use this request",
        hint: fields.length ? "Fix the highlighted fields and try again." : "Change the input and try again.",
      };
    case Code.ResourceExhausted:
      if (reason === "ARTIFACT_TOO_LARGE") {
        return {
          ...base,
          title: "The result is too large to send",
          hint: "Use a smaller resolution or size, or ask the operator to raise the server's message limit.",
        };
      }
      if (reason === "STORAGE_FULL") {
        // Not "busy": retrying in a moment does not help, only freed space does.
        return {
          ...base,
          title: `The ${server} has no room to save results`,
          hint: "Its storage is full, so nothing was kept. Try again later, once old results have been cleaned up, or tell whoever runs the server.",
        };
      }
      if (reason === "RATE_LIMITED") {
        // The gateway's per-caller request rate: waiting the RetryInfo delay is enough.
        return {
          ...base,
          kind: "busy",
          title: "Too many requests",
          hint:
            retryAfterS !== undefined
              ? `The gateway limits how often one caller may ask. Retry in ${Math.ceil(retryAfterS)} s.`
              : "The gateway limits how often one caller may ask. Retry in a moment.",
        };
      }
      if (reason === "QUOTA") {
        // This caller's own limit of queued plus running jobs, not a full server.
        return {
          ...base,
          kind: "busy",
          title: "You have as many jobs as you may",
          hint:
            retryAfterS !== undefined
              ? `Wait for one of your jobs to finish (or cancel one), then retry in ${Math.ceil(retryAfterS)} s.`
              : "Wait for one of your jobs to finish (or cancel one), then retry.",
        };
      }
      if (reason !== "CAPACITY") {
        // Only CAPACITY is a full server. Without a reason this is a transport limit (gRPC's
        // "message larger than max"): retrying never helps, so the server's own words are shown.
        return {
          ...base,
          title: "The request is too large",
          hint: "Use a smaller image (the limit is shown under the drop zone), or ask the operator to raise it.",
        };
      }
      return {
        ...base,
        kind: "busy",
        title: `The ${server} is busy`,
        hint:
          retryAfterS !== undefined
            ? `Every slot is taken and the queue is full. Retry in ${Math.ceil(retryAfterS)} s.`
            : "Every slot is taken and the queue is full. Retry in a moment.",
      };
    case Code.Unavailable:
      if (reason === "MODEL_NOT_READY") {
        return { ...base, title: "The model is not ready yet", hint: "It may still be loading; try again in a moment." };
      }
      if (reason === "SHUTTING_DOWN") {
        return { ...base, title: `The ${server} is shutting down`, hint: "Try again once it is back." };
      }
      if (reason === "REPLICA_LOST") {
        return {
          ...base,
          title: `The ${server} running this job stopped`,
          hint: "The job ended with it and nothing was kept. Run it again: another server takes it.",
        };
      }
      if (reason === "STORAGE_UNAVAILABLE") {
        return {
          ...base,
          title: `The ${server} cannot reach its storage`,
          hint: "Nothing was run. Whoever runs the server needs to check the object store (the message says which setting).",
        };
      }
      return {
        ...base,
        title: `Can't reach the ${server}`,
        hint: `The gateway answered, but the ${service} server behind it did not. Is it running? (\`make up\` starts everything.)`,
      };
    case Code.NotFound:
      // A job or a result past the server's retention period (or one it never had).
      return {
        ...base,
        title: "No longer on the server",
        hint: `The ${server} keeps jobs and results for a limited time and this one is gone. Run it again.`,
      };
    case Code.Unauthenticated:
      // The key dialog was cancelled (or the call could not ask): the gateway's words say why.
      return {
        ...base,
        title: "This gateway needs an API key",
        hint: "Choose Retry (or Enter API key at the top) and enter the key you were given.",
      };
    case Code.PermissionDenied:
      // A valid key that may not use this service, or an altered/expired artifact link: asking
      // for the key again would not help, so the page says so instead of looping.
      return {
        ...base,
        title: `Not allowed to use the ${server}`,
        hint: "Ask whoever runs Kiln for a key that may use it, or choose Forget key at the top and enter another one.",
      };
    case Code.DeadlineExceeded:
      return { ...base, title: "The job took too long", hint: "Try fewer steps or a smaller image." };
    case Code.Internal:
      return {
        ...base,
        title: `The ${server} failed`,
        hint: requestId
          ? `Try again; if it keeps failing, quote request id ${requestId} to whoever runs the server.`
          : "Try again; if it keeps failing, check the server's log.",
      };
    case Code.DataLoss:
      return { ...base, title: "The file arrived damaged", hint: "Try again; the server still has the original." };
    case Code.Unknown:
      return { ...base, title: "Something went wrong", hint: "Try again; if it keeps failing, check the gateway's log." };
    default:
      return { ...base, title: `Request failed (${base.status})`, hint: "Try again, or change the input." };
  }
}
