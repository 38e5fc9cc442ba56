"""Kiln's img2img model server: `kiln.img2img.v1.Img2ImgProvider`."""

SERVICE_NAME = "kiln.img2img.v1.Img2ImgProvider"
