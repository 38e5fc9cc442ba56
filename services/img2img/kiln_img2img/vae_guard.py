"""The fp16 VAE guard: an image whose decode is NaN or all black is decoded again in float32.

SD1.5's VAE decoder overflows float16 on some latents: the activations become inf, then NaN, and
diffusers turns NaN into a black picture without a word. The guard wraps the shared VAE's `decode`
(instance attribute, like the compile gate), checks each image of the batch, and redoes only the
bad ones in float32, so the other images of a batch keep their bytes. The float32 decoder is a copy
made at load when the pipeline runs in half precision (about 200 MB on the device for SD1.5,
eager, never compiled); a float32 pipeline redoes the decode on its own VAE, which only helps for a
transient fault but keeps the same code path testable on the CPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

# An image is "all black" when every decoded value maps to pixel 0: diffusers maps [-1, 1] to
# [0, 255] and rounds, so values below -1 + 1/255 become 0.
BLACK_BELOW = -1.0 + 1.0 / 255.0


def bad_images(sample: torch.Tensor) -> list[tuple[int, str]]:
    """(index, reason) of each image in a decoded batch that is NaN/inf ("nan") or all black ("black")."""
    flat = sample.detach().reshape(sample.shape[0], -1)
    bad: list[tuple[int, str]] = []
    finite = torch.isfinite(flat).all(dim=1).tolist()
    black = (flat.float() < BLACK_BELOW).all(dim=1).tolist()
    for index, (is_finite, is_black) in enumerate(zip(finite, black, strict=True)):
        if not is_finite:
            bad.append((index, "nan"))
        elif is_black:
            bad.append((index, "black"))
    return bad


def float32_copy(vae: Any) -> Any:
    """An eager float32 copy of `vae` on the same device, for redoing decodes."""
    copy = type(vae).from_config(vae.config)
    # strict=False: fused QKV adds to_qkv weights next to the unfused ones the copy keeps using.
    missing, _ = copy.load_state_dict(vae.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"float32 VAE copy misses weights: {missing[:3]}")
    return copy.to(device=vae.device, dtype=torch.float32).eval()


class VaeGuard:
    """Wraps `vae.decode`; see the module docstring.

    Attributes:
        redone: Images decoded again, by reason ("nan", "black").
    """

    def __init__(self, vae: Any, *, on_redo: Callable[[str], None] | None = None) -> None:
        self.vae = vae
        self.decode: Callable[..., Any] = vae.decode
        self.fallback = float32_copy(vae) if vae.dtype != torch.float32 else None
        self.on_redo = on_redo
        self.redone: dict[str, int] = {"nan": 0, "black": 0}
        self._lock = threading.Lock()
        vae.decode = self

    def __call__(self, z: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        output = self.decode(z, return_dict=return_dict, **kwargs)
        sample: torch.Tensor = output.sample if return_dict else output[0]
        bad = bad_images(sample)
        if not bad:
            return output
        decoder = self.fallback.decode if self.fallback is not None else self.decode
        fixed = sample.clone()
        for index, reason in bad:
            with self._lock:
                self.redone[reason] += 1
            if self.on_redo is not None:
                self.on_redo(reason)
            log.warning("VAE decode of image %d was %s; decoding it again in float32", index, reason)
            redo = decoder(z[index : index + 1].to(torch.float32), return_dict=False, **kwargs)[0]
            if bad_images(redo):
                log.warning("the float32 decode of image %d is still NaN or black; keeping it", index)
            fixed[index] = redo[0].to(sample.dtype)
        if return_dict:
            output.sample = fixed
            return output
        return (fixed, *output[1:])

    def remove(self) -> None:
        """Give the VAE its own `decode` back."""
        del self.vae.decode
