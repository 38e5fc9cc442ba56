#!/usr/bin/env bash
# Probes and drain for the gateway container, which has bash but no curl or Python:
#   kiln-gateway health          exit 0 when Envoy answers 200 on /healthz (Docker HEALTHCHECK)
#   kiln-gateway drain SECONDS   fail /healthz and close connections gracefully (admin
#                                POST /healthcheck/fail), then wait SECONDS for in-flight
#                                streams before SIGTERM stops Envoy (Kubernetes preStop)
# Ports follow the rendered config: public 8080, admin 9901 (admin listens on 127.0.0.1 only).
set -euo pipefail

PUBLIC_PORT="${KILN_GATEWAY_PORT:-8080}"
ADMIN_PORT="${KILN_GATEWAY_ADMIN_PORT:-9901}"

# One HTTP/1.1 request over bash's /dev/tcp (Envoy answers HTTP/1.0 with 426); prints the
# status line.
request() {
  local method=$1 port=$2 path=$3
  exec 3<>"/dev/tcp/127.0.0.1/${port}"
  printf '%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' \
    "$method" "$path" >&3
  local status
  IFS= read -r -t 5 status <&3 || status=""
  exec 3<&-
  printf '%s\n' "${status%$'\r'}"
}

case "${1:-}" in
  health)
    status=$(request GET "$PUBLIC_PORT" /healthz)
    echo "$status"
    [[ "$status" == *" 200 "* || "$status" == *" 200" ]]
    ;;
  drain)
    request POST "$ADMIN_PORT" /healthcheck/fail
    sleep "${2:-20}"
    ;;
  *)
    echo "usage: kiln-gateway health | drain SECONDS" >&2
    exit 2
    ;;
esac
