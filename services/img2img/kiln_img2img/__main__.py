"""`python -m kiln_img2img` and `kiln-img2img`: run the img2img server until SIGTERM."""

from __future__ import annotations

from kiln_img2img.server import SPEC

main = SPEC.main

if __name__ == "__main__":
    main()
