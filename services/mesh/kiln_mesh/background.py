"""Background removal with rembg, built once at load time and never downloading when offline.

rembg has traps for a server:
`rembg.remove()` without `session=` and `new_session()` without a name both mean
`bria-rmbg`, which rembg downloads from GitHub; a missing model file is fetched by pooch;
`u2net_custom` refuses a `model_path` outside rembg's home; and without `providers=` rembg
probes for GPUs. `BackgroundRemover` names the model, passes the session and the providers
(`choose_providers`: CUDA beside a CUDA model when onnxruntime-gpu is installed, else the CPU)
explicitly, and, offline, checks for the model file itself before rembg can try a download.

rembg is imported in `load()` only: importing it costs seconds (numba kernels of pymatting)
and a plain `rembg` install without onnxruntime calls `sys.exit(1)` on import, which must
surface as a load error, not kill the process at import time.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from kiln_runtime.model_source import ModelUnavailable

log = logging.getLogger(__name__)

MODEL_PATH_SETTING = "KILN_MESH__TRIPOSR__REMBG_MODEL_PATH"
MODEL_NAME_SETTING = "KILN_MESH__TRIPOSR__REMBG_MODEL"
DEVICE_SETTING = "KILN_MESH__TRIPOSR__REMBG_DEVICE"
PROVIDERS = ["CPUExecutionProvider"]
"""The CPU provider, always available and always the fallback."""
CUDA_PROVIDER = "CUDAExecutionProvider"
# onnxruntime-gpu (the CUDA 12 build, matching torch's cu12 wheels) lists this provider; the plain
# onnxruntime wheel does not. The two wheels install the same `onnxruntime` module and must not be
# installed together, so a GPU image installs rembg without its [cpu] extra plus onnxruntime-gpu.

RembgDevice = Literal["auto", "cpu", "cuda"]


def choose_providers(device: RembgDevice, model_device: str, available: Sequence[str]) -> list[str]:
    """The onnxruntime providers for rembg's session, best first.

    u2net takes ~11 ms per image on a CPU core but a few ms on a GPU, which matters next to a
    sub-second mesh path; on a CPU-only model there is no GPU to share.

    Args:
        device: The setting: "cpu", "cuda" (required), or "auto" (CUDA when the mesh model runs
            on CUDA and the provider is installed).
        model_device: The mesh model's torch device type ("cuda", "mps", "cpu").
        available: `onnxruntime.get_available_providers()`.

    Returns:
        ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` or ``["CPUExecutionProvider"]``.

    Raises:
        ModelUnavailable: ``device`` is "cuda" but the installed onnxruntime has no CUDA provider.
    """
    if device == "cpu":
        return list(PROVIDERS)
    has_cuda = CUDA_PROVIDER in available
    if device == "cuda" and not has_cuda:
        raise ModelUnavailable(
            f"{DEVICE_SETTING}=cuda but the installed onnxruntime offers only {list(available)}; install "
            "onnxruntime-gpu (and not onnxruntime) or set it to auto or cpu"
        )
    if device == "cuda" or (model_device == "cuda" and has_cuda):
        return [CUDA_PROVIDER, *PROVIDERS]
    return list(PROVIDERS)


# rembg reads U2NET_HOME when a session is created; `load()` may set it for a moment.
_ENV_LOCK = threading.Lock()


def rembg_model_candidates(model_name: str) -> list[Path]:
    """The files rembg 2.0.86 accepts as an existing `<model_name>` model, in its order.

    Mirrors `rembg.sessions.base.BaseSession.resolve_existing`: first
    `<home>/models/<name>/<name>.onnx` where home is `U2NET_HOME`, else `REMBG_HOME`, else
    `$XDG_DATA_HOME/rembg`, else `~/.rembg`; then the legacy flat
    `<U2NET_HOME or $XDG_DATA_HOME/.u2net or ~/.u2net>/<name>.onnx`. rembg never hashes an
    existing file, so whatever is found there is used as is.

    Args:
        model_name: A rembg session name whose model is one `<name>.onnx` file (u2net,
            u2netp, u2net_human_seg, silueta, isnet-general-use, ...).

    Returns:
        The candidate paths; rembg uses the first that exists.
    """
    fname = f"{model_name}.onnx"
    u2net_home = os.getenv("U2NET_HOME")
    legacy = Path(os.path.expanduser(u2net_home or os.path.join(os.getenv("XDG_DATA_HOME", "~"), ".u2net")))
    if u2net_home:
        home = legacy
    else:
        xdg = os.getenv("XDG_DATA_HOME")
        default = os.path.join(xdg, "rembg") if xdg else os.path.join("~", ".rembg")
        home = Path(os.path.expanduser(os.getenv("REMBG_HOME", default)))
    return [home / "models" / model_name / fname, legacy / fname]


@contextmanager
def _u2net_home(directory: Path) -> Iterator[None]:
    """Point U2NET_HOME at `directory` while a session is built, then restore it.

    `u2net_custom` only accepts a `model_path` under rembg's home, and U2NET_HOME wins over
    every other home variable, so this makes any configured path acceptable without copying
    the file. rembg reads the variable only while the session is created.
    """
    with _ENV_LOCK:
        previous = os.environ.get("U2NET_HOME")
        os.environ["U2NET_HOME"] = str(directory)
        try:
            yield
        finally:
            if previous is None:
                del os.environ["U2NET_HOME"]
            else:
                os.environ["U2NET_HOME"] = previous


class BackgroundRemover:
    """One rembg session per server; call it with an image to get the RGBA cut-out.

    Calls after `load()` are safe from several threads (onnxruntime sessions are
    thread-safe and rembg's u2net predict keeps no state), though the mesh server runs one
    job at a time anyway.
    """

    def __init__(
        self,
        *,
        model_name: str = "u2net",
        model_path: Path | None = None,
        offline: bool = True,
        device: RembgDevice = "cpu",
        model_device: str = "cpu",
    ) -> None:
        """Remember the configuration; nothing is imported or loaded until `load()`.

        Args:
            model_name: rembg session name used when `model_path` is None.
            model_path: A u2net-compatible ONNX file, loaded as rembg's `u2net_custom`.
            offline: Never let rembg download; a missing model is a load error instead.
            device: Where rembg runs (see `choose_providers`).
            model_device: The mesh model's device type, for ``device="auto"``.
        """
        self.model_name = model_name
        self.model_path = model_path
        self.offline = offline
        self.device: RembgDevice = device
        self.model_device = model_device
        self.providers = list(PROVIDERS)  # chosen in load(), once onnxruntime is imported
        self._session: Any = None  # rembg.sessions.base.BaseSession (rembg is untyped)
        self._remove: Any = None  # rembg.remove
        self._load_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether `load()` has built the session."""
        return self._session is not None

    def describe(self) -> str:
        """Which model this remover uses, for logs and provenance."""
        return f"rembg u2net_custom:{self.model_path}" if self.model_path is not None else f"rembg {self.model_name}"

    def load(self) -> None:
        """Import rembg and build the session (server start-up; idempotent).

        Raises:
            ModelUnavailable: The model file is missing (offline, or a bad `model_path`), or
                rembg cannot be imported; the message names the settings to change.
        """
        with self._load_lock:
            if self._session is not None:
                return
            rembg = _import_rembg()
            self.providers = choose_providers(self.device, self.model_device, _available_providers())
            if self.model_path is not None:
                session = self._custom_session(rembg, self.model_path)
            else:
                session = self._named_session(rembg)
            self._remove = rembg.remove
            self._session = session
            self.providers = _active_providers(session, self.providers)
            log.info("background remover ready: %s on %s", self.describe(), self.providers[0])

    def close(self) -> None:
        """Drop the session (its onnxruntime graph and weights); `load()` builds it again."""
        with self._load_lock:
            self._session = None
            self._remove = None

    def _custom_session(self, rembg: Any, model_path: Path) -> Any:
        path = model_path.expanduser().absolute()
        if not path.is_file():
            raise ModelUnavailable(
                f"{MODEL_PATH_SETTING}={model_path} is not a file; point it at a u2net-compatible ONNX model"
            )
        with _u2net_home(path.parent):
            return rembg.new_session("u2net_custom", model_path=str(path), providers=list(self.providers))

    def _named_session(self, rembg: Any) -> Any:
        candidates = rembg_model_candidates(self.model_name)
        if not any(candidate.is_file() for candidate in candidates):
            if self.offline:
                # rembg would hand the missing file to pooch, i.e. try GitHub; fail here instead.
                looked = ", ".join(str(candidate) for candidate in candidates)
                raise ModelUnavailable(
                    f"rembg model {self.model_name!r} is not installed (looked for {looked}) and offline mode "
                    f"is on; set {MODEL_PATH_SETTING} to a u2net ONNX file, or place {self.model_name}.onnx in "
                    "U2NET_HOME (or REMBG_HOME) and set that variable"
                )
            log.warning(
                "rembg model %r is not installed; rembg is downloading it from GitHub into %s",
                self.model_name,
                candidates[0].parent,
            )
        return rembg.new_session(self.model_name, providers=list(self.providers))

    def __call__(self, image: Image.Image) -> Image.Image:
        """Cut the object out of `image`.

        Args:
            image: An RGB or RGBA image (rembg segments its RGB channels).

        Returns:
            An RGBA image of the same size whose alpha is rembg's mask.

        Raises:
            RuntimeError: `load()` has not run.
        """
        if self._session is None:
            raise RuntimeError("BackgroundRemover.load() must run before the remover is used")
        # session= always: without it rembg builds (and downloads) a bria-rmbg session per call.
        result = self._remove(image, session=self._session)
        if not isinstance(result, Image.Image):
            raise RuntimeError(f"rembg returned {type(result).__name__}, expected a PIL image")
        return result if result.mode == "RGBA" else result.convert("RGBA")


def _import_rembg() -> Any:
    try:
        # Imported here, at load time only: see the module docstring.
        import rembg  # type: ignore[import-untyped]
    except SystemExit as err:
        # rembg exits the interpreter when no onnxruntime backend is installed.
        raise ModelUnavailable(
            "rembg is installed without an onnxruntime backend; install rembg[cpu] (or rembg[gpu])"
        ) from err
    except ImportError as err:
        raise ModelUnavailable(f"rembg is not installed ({err}); install rembg[cpu]") from err
    return rembg


def _available_providers() -> list[str]:
    # rembg imports onnxruntime itself, so it is importable once _import_rembg() has succeeded.
    import onnxruntime  # type: ignore[import-untyped]

    return list(onnxruntime.get_available_providers())


def _active_providers(session: Any, requested: list[str]) -> list[str]:
    """The providers the onnxruntime session really uses (rembg keeps it as `inner_session`).

    onnxruntime does not fail when the CUDA provider cannot start (CUDA 12 libraries missing,
    no device): it logs and runs on the CPU. Say so once here instead of leaving a silent
    slowdown.
    """
    inner = getattr(session, "inner_session", None)
    active = list(inner.get_providers()) if inner is not None else list(requested)
    if CUDA_PROVIDER in requested and CUDA_PROVIDER not in active:
        log.warning("rembg asked onnxruntime for %s but it runs on %s; check the CUDA 12 libraries", requested, active)
    return active
