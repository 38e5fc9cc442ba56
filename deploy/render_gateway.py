"""Write (or `--check`) the gateway's container configs: deploy/k8s/base/envoy.yaml and its TLS variant.

The gateway image copies the first to /etc/envoy/envoy.yaml and the Kubernetes base turns it
into a ConfigMap; the component deploy/k8s/components/tls replaces that ConfigMap with the
second (HTTPS, mutual TLS to the servers). Both come from `render_config`, the template `make up`
renders, through `gateway.kiln_gateway.container`. Run it after changing the gateway's render
code or settings:

    .venv/bin/python deploy/render_gateway.py           # rewrite the file
    .venv/bin/python deploy/render_gateway.py --check   # exit 1 if it is stale (tests do this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `gateway.kiln_gateway` is imported from the repository root

from gateway.kiln_gateway.container import CONFIG_PATH, TLS_CONFIG_PATH, render_container_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed file differs; write nothing")
    args = parser.parse_args(argv)
    status = 0
    for path, tls in ((CONFIG_PATH, False), (TLS_CONFIG_PATH, True)):
        text = render_container_config(tls=tls)
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            print(f"{path.relative_to(ROOT)} is stale; run: python deploy/render_gateway.py", file=sys.stderr)
            status = 1
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
