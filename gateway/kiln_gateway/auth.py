"""Authentication at the gateway: API keys or JWTs, the principal header, service access.

Everything runs inside Envoy (no auth proxy, no ext_authz service):

- `api_key`: a Lua filter (`AUTH_FILTER`) reads the keys file itself, at run time, and looks the
  bearer key up. Envoy's api_key_auth filter was not used: in 1.40 it is marked work-in-progress
  (outside Envoy's threat model) and takes its keys inline, so they would sit in the rendered
  config, which for containers is a committed ConfigMap. A file read by Envoy lets a Kubernetes
  Secret (a mounted file) hold the keys, and a changed file applies within `KEYS_RELOAD_S`.
- `jwt`: Envoy's jwt_authn verifies the token (issuer, audiences, JWKS file or URI) and lets every
  request on, writing either the payload or its failure into dynamic metadata; the same Lua filter
  then refuses with a message a person can act on, sets the principal from the configured claim
  and checks the services claim.
- `none`: the Lua filter only removes a client's copy of the principal header.

In every mode the Lua filter removes any `x-kiln-principal` a client sent before anything reads
it; only the gateway sets it. Refusals are local replies: Envoy turns them into grpc-status 16 / 7
for gRPC and gRPC-Web, and `local_reply_mappers` into a JSON `google.rpc.Status` for JSON clients.
Routes carry what the filter needs as route metadata under `AUTH_FILTER`: `open` (static files,
signed artifact links) or `service` (img2img, mesh).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kiln_runtime.principal import PRINCIPAL_HEADER

from .envoy_types import typed as _typed
from .settings import AUTH_SERVICES, GatewaySettings

#: The Lua filter's name; its route metadata lives under the same name.
AUTH_FILTER = "kiln.auth"
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PROVIDER = "kiln"
#: The cluster of a remote JWKS (rendered only when `auth.jwt.jwks_uri` is set).
JWKS_CLUSTER = "kiln_jwks"
#: Where jwt_authn leaves the verified payload, or why verification failed, for the Lua filter.
JWT_PAYLOAD_KEY = "jwt_payload"
JWT_FAILURE_KEY = "jwt_failure"
#: A signed link's `signature` query parameter: lowercase hex (kiln_runtime.signing; an exact
#: length would exceed RE2's default program size, and the server checks the value anyway).
SIGNATURE_PATTERN = "[0-9a-f]+"
#: Seconds a worker keeps the keys file it read before reading it again.
KEYS_RELOAD_S = 5
#: How long Envoy keeps a fetched remote JWKS.
JWKS_CACHE_S = 600
#: CA bundle Envoy trusts for an https JWKS URI (Envoy has no system trust store of its own); the
#: Debian/Ubuntu/Alpine location, which the Envoy image also uses.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

MISSING_KEY = (
    "this gateway needs an API key: send `authorization: Bearer <key>` "
    "(kiln --api-key, or KILN_API_KEY); ask the gateway's operator for a key"
)
INVALID_KEY = (
    "the API key sent is not valid for this gateway: send `authorization: Bearer <key>` with a key "
    "from the gateway's operator (kiln --api-key, or KILN_API_KEY)"
)
UNREADABLE_KEYS = "the gateway cannot read its API keys file; its operator must fix it (see the gateway's log)"


@dataclass(frozen=True)
class ApiKey:
    """One line of the keys file."""

    name: str
    key: str
    services: frozenset[str] | None  # None: every service


def parse_api_keys(text: str) -> list[ApiKey]:
    """Parse the keys file: `name key [service,service]` per line, `#` starts a comment line.

    The Lua filter reads the same format while Envoy runs; this is the strict check run before
    Envoy starts (`check_api_keys_file`), which names the line of a mistake.

    Args:
        text: The file's content.

    Returns:
        Its keys, in file order.

    Raises:
        ValueError: On a malformed line, an unknown service, or a repeated name or key.
    """
    keys: list[ApiKey] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) not in (2, 3):
            raise ValueError(f"line {number}: expected `name key [service,service]`, got {len(fields)} fields")
        name, key = fields[0], fields[1]
        services = None
        if len(fields) == 3:
            services = frozenset(part for part in fields[2].split(",") if part)
            unknown = sorted(services - set(AUTH_SERVICES))
            if unknown or not services:
                raise ValueError(f"line {number}: services must be from {', '.join(AUTH_SERVICES)}, got {fields[2]!r}")
        if any(earlier.name == name for earlier in keys):
            raise ValueError(f"line {number}: the name {name!r} is used twice")
        if any(earlier.key == key for earlier in keys):
            raise ValueError(f"line {number}: a key is used twice (for {name!r})")  # never print a key
        keys.append(ApiKey(name, key, services))
    return keys


def check_api_keys_file(settings: GatewaySettings) -> list[str]:
    """Check the keys file before an Envoy that reads it starts here (`make up`, the launcher).

    Args:
        settings: The gateway settings; nothing is checked unless `auth.mode` is api_key.

    Returns:
        Warnings a person should see (a file others may read).

    Raises:
        ValueError: When the file is missing, unreadable, malformed or holds no key.
    """
    path = settings.auth.api_keys_file
    if settings.auth.mode != "api_key" or path is None:
        return []
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read the API keys file {path}: {error.strerror or error}") from error
    try:
        keys = parse_api_keys(text)
    except ValueError as error:
        raise ValueError(f"API keys file {path}: {error}") from error
    if not keys:
        raise ValueError(f"API keys file {path} holds no key: add lines `name key [service,service]`")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [f"the API keys file {path} may be read by other users: chmod 600 {path}"]
    return []


def _lua_string(value: str) -> str:
    """A Lua string literal of `value` (quotes, backslashes and control characters escaped)."""
    out = []
    for char in value:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif ord(char) < 32 or ord(char) == 127:
            out.append(f"\\{ord(char):03d}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


#: The filter's logic; `_lua_source` prepends the settings as Lua constants. Locals at chunk
#: level live as long as the worker's Lua state, so the keys read are cached per worker.
AUTH_LUA = """
local keys = nil
local loaded_at = -KEYS_RELOAD_S

-- The keys file: `name key [service,service]`, lines starting with # are comments. Malformed
-- lines are skipped here; the launcher's strict check names them before Envoy starts.
local function parse_keys(file)
  local found = {}
  for line in file:lines() do
    if not line:match("^%s*#") then
      local name, key, services = line:match("^%s*(%S+)%s+(%S+)%s*(%S*)%s*$")
      if name ~= nil then
        local allowed = nil
        if services ~= "" then
          allowed = {}
          for service in services:gmatch("[^,]+") do
            allowed[service] = true
          end
        end
        found[key] = {name = name, services = allowed}
      end
    end
  end
  return found
end

-- The keys, read again every KEYS_RELOAD_S seconds (a rotated Secret applies without a restart).
-- A file that cannot be read keeps the last good keys; never read at all, every call is refused.
local function current_keys(handle)
  local now = os.time()
  if now - loaded_at < KEYS_RELOAD_S then
    return keys
  end
  loaded_at = now
  local file, err = io.open(KEYS_FILE, "r")
  if file == nil then
    handle:logErr("kiln auth: cannot read the API keys file: " .. tostring(err))
    return keys
  end
  local ok, found = pcall(parse_keys, file)
  file:close()
  if ok then
    keys = found
  else
    handle:logErr("kiln auth: cannot parse the API keys file: " .. tostring(found))
  end
  return keys
end

local function bearer(value)
  if value == nil then
    return nil
  end
  return value:match("^%s*[Bb][Ee][Aa][Rr][Ee][Rr]%s+(%S+)%s*$")
end

local function refuse(handle, status, message, challenge)
  local headers = {[":status"] = tostring(status), ["content-type"] = "text/plain; charset=utf-8"}
  if status == 401 then
    headers["www-authenticate"] = challenge or "Bearer"
  end
  handle:respond(headers, message)
end

local function denied(who, service)
  return who .. " may not use the " .. service .. " service through this gateway; ask the gateway's " ..
    "operator to allow it"
end

-- A services claim as a set: a list, or a string of names separated by commas or spaces.
local function service_set(claim)
  if claim == nil then
    return nil
  end
  local allowed = {}
  if type(claim) == "table" then
    for _, service in pairs(claim) do
      allowed[tostring(service)] = true
    end
  elseif type(claim) == "string" then
    for service in claim:gmatch("[^,%s]+") do
      allowed[service] = true
    end
  end
  return allowed
end

local function may_use(allowed, service)
  return service == nil or allowed == nil or allowed[service] == true
end

local function with_api_key(handle, headers, service)
  local token = bearer(headers:get("authorization"))
  if token == nil then
    return refuse(handle, 401, MISSING_CREDENTIALS)
  end
  local known = current_keys(handle)
  if known == nil then
    return refuse(handle, 503, UNREADABLE_KEYS)
  end
  local entry = known[token]
  if entry == nil then
    return refuse(handle, 401, INVALID_CREDENTIALS, 'Bearer error="invalid_token"')
  end
  if not may_use(entry.services, service) then
    return refuse(handle, 403, denied("the API key of " .. entry.name, service))
  end
  -- The servers need the name, not the key: a key that never reaches them is never in their logs.
  headers:remove("authorization")
  headers:replace(PRINCIPAL_HEADER, entry.name)
end

local function with_jwt(handle, headers, service)
  local verdict = handle:streamInfo():dynamicMetadata():get(JWT_NAMESPACE) or {}
  local payload = verdict[JWT_PAYLOAD_KEY]
  if payload == nil then
    local failure = verdict[JWT_FAILURE_KEY]
    if bearer(headers:get("authorization")) == nil or failure == nil then
      return refuse(handle, 401, MISSING_CREDENTIALS)
    end
    return refuse(handle, 401, "the token sent was refused (" .. tostring(failure.message) .. "): " ..
      INVALID_CREDENTIALS, 'Bearer error="invalid_token"')
  end
  local principal = payload[PRINCIPAL_CLAIM]
  if type(principal) == "number" then
    principal = string.format("%d", principal)
  end
  if type(principal) ~= "string" or principal == "" or principal:find("%c") then
    return refuse(handle, 401, "the token has no usable `" .. PRINCIPAL_CLAIM .. "` claim naming the caller: " ..
      INVALID_CREDENTIALS, 'Bearer error="invalid_token"')
  end
  if not may_use(service_set(payload[SERVICES_CLAIM]), service) then
    return refuse(handle, 403, denied("the token of " .. principal, service))
  end
  headers:replace(PRINCIPAL_HEADER, principal)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  -- Only the gateway names the principal: a client's copy never passes, on any route, in any mode.
  headers:remove(PRINCIPAL_HEADER)
  if MODE == "none" then
    return
  end
  local route = handle:metadata()
  if route:get("open") then
    return
  end
  local service = route:get("service")
  if MODE == "api_key" then
    with_api_key(handle, headers, service)
  else
    with_jwt(handle, headers, service)
  end
end
"""


def _missing_credentials(settings: GatewaySettings) -> str:
    if settings.auth.mode == "jwt":
        return (
            f"this gateway needs a token (JWT) from {settings.auth.jwt.issuer}: send `authorization: Bearer "
            "<token>` (kiln --token, or KILN_TOKEN)"
        )
    return MISSING_KEY


def _invalid_credentials(settings: GatewaySettings) -> str:
    if settings.auth.mode == "jwt":
        jwt = settings.auth.jwt
        return (
            f"send `authorization: Bearer <token>` with a current token from {jwt.issuer} "
            f"for {' or '.join(jwt.audiences)}"
        )
    return INVALID_KEY


def _lua_source(settings: GatewaySettings) -> str:
    auth = settings.auth
    constants = {
        "MODE": auth.mode,
        "KEYS_FILE": str(auth.api_keys_file or ""),
        "PRINCIPAL_HEADER": PRINCIPAL_HEADER,
        "PRINCIPAL_CLAIM": auth.jwt.principal_claim,
        "SERVICES_CLAIM": auth.jwt.services_claim,
        "JWT_NAMESPACE": JWT_FILTER,
        "JWT_PAYLOAD_KEY": JWT_PAYLOAD_KEY,
        "JWT_FAILURE_KEY": JWT_FAILURE_KEY,
        "MISSING_CREDENTIALS": _missing_credentials(settings),
        "INVALID_CREDENTIALS": _invalid_credentials(settings),
        "UNREADABLE_KEYS": UNREADABLE_KEYS,
    }
    lines = [f"local {name} = {_lua_string(value)}" for name, value in constants.items()]
    lines.append(f"local KEYS_RELOAD_S = {KEYS_RELOAD_S}")
    return "\n".join(lines) + "\n" + AUTH_LUA.lstrip()


def _jwks_source(settings: GatewaySettings) -> dict[str, Any]:
    jwt = settings.auth.jwt
    if jwt.jwks_file is not None:
        # Envoy reads the file when the config loads (a mounted Secret in a container).
        return {"local_jwks": {"filename": str(jwt.jwks_file)}}
    return {
        "remote_jwks": {
            "http_uri": {"uri": jwt.jwks_uri, "cluster": JWKS_CLUSTER, "timeout": "5s"},
            "cache_duration": f"{JWKS_CACHE_S}s",
            # Fetched when Envoy starts and refreshed in the background, not on a caller's request.
            "async_fetch": {},
            "retry_policy": {"num_retries": 3},
        }
    }


def _jwt_authn(settings: GatewaySettings) -> dict[str, Any]:
    jwt = settings.auth.jwt
    provider = {
        "issuer": jwt.issuer,
        "audiences": list(jwt.audiences),
        **_jwks_source(settings),
        # Only the header: not Envoy's default `access_token` query parameter, which would put
        # tokens into URLs (browser history, proxies' logs).
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        # The token stops here (the header is removed once verified): the servers get the principal.
        "forward": False,
        "payload_in_metadata": JWT_PAYLOAD_KEY,
        "failed_status_in_metadata": JWT_FAILURE_KEY,
        "clock_skew_seconds": 60,
    }
    return {
        "name": JWT_FILTER,
        "typed_config": _typed(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers={JWT_PROVIDER: provider},
            # Verification never answers by itself: the Lua filter refuses with a message that says
            # what to send, the same on every protocol, and checks the services claim.
            rules=[
                {
                    "match": {"prefix": "/"},
                    "requires": {
                        "requires_any": {
                            "requirements": [{"provider_name": JWT_PROVIDER}, {"allow_missing_or_failed": {}}]
                        }
                    },
                }
            ],
        ),
    }


def http_filters(settings: GatewaySettings) -> list[dict[str, Any]]:
    """Filters placed after grpc_web and before the rate limit and the transcoder."""
    lua = {
        "name": AUTH_FILTER,
        "typed_config": _typed(
            "envoy.extensions.filters.http.lua.v3.Lua",
            default_source_code={"inline_string": _lua_source(settings)},
        ),
    }
    return [_jwt_authn(settings), lua] if settings.auth.mode == "jwt" else [lua]


def _open(route: dict[str, Any]) -> dict[str, Any]:
    """`route` passed without credentials (the principal header is still removed)."""
    per_filter = {
        **route.get("typed_per_filter_config", {}),
        JWT_FILTER: _typed("envoy.config.route.v3.FilterConfig", disabled=True),
    }
    metadata = {"filter_metadata": {AUTH_FILTER: {"open": True}}}
    return {**route, "metadata": metadata, "typed_per_filter_config": per_filter}


def _for_service(route: dict[str, Any], service: str) -> dict[str, Any]:
    return {**route, "metadata": {"filter_metadata": {AUTH_FILTER: {"service": service}}}}


def apply_to_routes(settings: GatewaySettings, routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjust the rendered routes (open static files, the signed-link route, per-service access).

    Static files are open; a download under `/v1/artifacts/` carrying a `signature` query
    parameter gets a route of its own before the artifacts REST route, open too (the artifact
    server checks the signature and the expiry); the model services' routes name their service,
    which the keys file and the JWT services claim may restrict.
    """
    from .render import ARTIFACTS, SERVICES  # render imports this module

    by_prefix = {f"/{service.grpc_service}/": service.cluster for service in SERVICES}
    by_prefix.update({service.rest_prefix: service.cluster for service in SERVICES})
    adjusted: list[dict[str, Any]] = []
    for route in routes:
        prefix = route.get("match", {}).get("prefix")
        if "direct_response" in route:
            adjusted.append(_open(route))
        elif prefix == ARTIFACTS.rest_prefix:
            signed = {
                **route,
                "match": {
                    "prefix": f"{ARTIFACTS.rest_prefix}/",
                    # A signature's shape, not mere presence: an empty `signature=` would reach the
                    # server as an unsigned request without credentials, i.e. as `anonymous`.
                    "query_parameters": [
                        {"name": "signature", "string_match": {"safe_regex": {"regex": SIGNATURE_PATTERN}}}
                    ],
                },
            }
            adjusted += [_open(signed), route]
        elif prefix in by_prefix:
            adjusted.append(_for_service(route, by_prefix[prefix]))
        else:
            adjusted.append(route)
    return adjusted


def clusters(settings: GatewaySettings) -> list[dict[str, Any]]:
    """The remote JWKS's cluster, when `auth.jwt.jwks_uri` is set; else none."""
    if settings.auth.mode != "jwt" or not settings.auth.jwt.jwks_uri:
        return []
    parts = urlsplit(settings.auth.jwt.jwks_uri)
    host = parts.hostname or ""
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    address = {"socket_address": {"address": host, "port_value": port}}
    cluster: dict[str, Any] = {
        "name": JWKS_CLUSTER,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": JWKS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }
    if secure:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _typed(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                sni=host,
                common_tls_context={
                    "validation_context": {
                        "trusted_ca": {"filename": SYSTEM_CA_BUNDLE},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
                    }
                },
            ),
        }
    return [cluster]


def _status_is(status: int) -> dict[str, Any]:
    comparison = {"op": "EQ", "value": {"default_value": status, "runtime_key": f"kiln_auth_{status}"}}
    return {"status_code_filter": {"comparison": comparison}}


def local_reply_mappers(settings: GatewaySettings) -> list[dict[str, Any]]:
    """Envoy's 401 and 403 as JSON `google.rpc.Status` with the gRPC code (16, 7), for JSON clients.

    gRPC and gRPC-Web requests (content-type application/grpc once the grpc_web filter has run)
    match the first mapper, which changes nothing: Envoy answers them with grpc-status 16 / 7 and
    the refusal's text as grpc-message, which a JSON body format would otherwise replace.
    """
    refusals = {"or_filter": {"filters": [_status_is(401), _status_is(403)]}}
    grpc_request = {
        "header_filter": {"header": {"name": "content-type", "string_match": {"prefix": "application/grpc"}}}
    }
    return [
        {"filter": {"and_filter": {"filters": [refusals, grpc_request]}}},
        *(
            {
                "filter": _status_is(status),
                "body_format_override": {"json_format": {"code": code, "message": "%LOCAL_REPLY_BODY%"}},
            }
            for status, code in ((401, 16), (403, 7))
        ),
    ]


#: Access log line: like Envoy's default, but the path without its query (a signed link's
#: signature stays out of the log) and with the principal; never a request's authorization.
ACCESS_LOG_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %GRPC_STATUS% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '"%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%UPSTREAM_HOST%" '
    f'principal="%REQ({PRINCIPAL_HEADER.upper()})%"\n'
)


def access_log_format() -> dict[str, Any]:
    """The `log_format` of the stdout access log (`ACCESS_LOG_FORMAT`)."""
    return {
        "text_format_source": {"inline_string": ACCESS_LOG_FORMAT},
        "formatters": [
            {
                "name": "envoy.formatter.req_without_query",
                "typed_config": _typed("envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"),
            }
        ],
    }
