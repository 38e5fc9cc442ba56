"""`python -m kiln_img2img`: run the img2img server until SIGTERM."""

from __future__ import annotations

from kiln_img2img.config import Img2ImgSettings
from kiln_img2img.server import create_server
from kiln_runtime.main import run_main


def main() -> None:
    run_main(Img2ImgSettings, create_server, section="img2img")


if __name__ == "__main__":
    main()
