"""Write (or `--check`) the gateway's container config: deploy/k8s/base/envoy.yaml.

The gateway image copies that file to /etc/envoy/envoy.yaml and the Kubernetes base turns it
into a ConfigMap; both come from `render_config`, the template `make up` renders, through
`gateway.kiln_gateway.container`. Run it after changing the gateway's render code or settings:

    .venv/bin/python deploy/render_gateway.py           # rewrite the file
    .venv/bin/python deploy/render_gateway.py --check   # exit 1 if it is stale (tests do this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `gateway.kiln_gateway` is imported from the repository root

from gateway.kiln_gateway.container import CONFIG_PATH, render_container_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file differs; write nothing")
    args = parser.parse_args(argv)
    text = render_container_config()
    current = CONFIG_PATH.read_text() if CONFIG_PATH.exists() else None
    if args.check:
        if current != text:
            print(f"{CONFIG_PATH.relative_to(ROOT)} is stale; run: python deploy/render_gateway.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        CONFIG_PATH.write_text(text)
        print(f"wrote {CONFIG_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
