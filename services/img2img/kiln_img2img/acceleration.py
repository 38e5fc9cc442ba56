"""Compiled execution of the SD1.5 modules: torch.compile behind a shape gate, channels_last, fused QKV.

torch.compile with `dynamic=False` specialises a graph (and, in `reduce-overhead` mode, a CUDA
graph) to the input shapes it first sees; every new shape recompiles, which takes seconds to
minutes and, after torch._dynamo's recompile limit, silently falls back to eager for good. A
server that compiled whatever shape a client sent would stall jobs behind recompiles (a
"recompilation storm") and hold one CUDA graph pool per shape.

So each compiled module sits behind a `ShapeGate`: the warm-up opens it (`learning`), every shape
seen then is compiled and captured before health says SERVING, and afterwards only those shapes
run compiled. Any other shape (a size or batch size that was not warmed, guidance off, which
halves the UNet batch) runs the same module eagerly: correct and as fast as without compilation,
never a recompile. `fallbacks` counts those calls so an operator can see a size worth warming.

The gate replaces the module's `forward` on the instance, not the module: the pipeline keeps
the real `UNet2DConditionModel` / `Decoder` (config, dtype, attention processors, hooks), and
state dicts are unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch

from kiln_img2img.config import AccelerationSettings, CompileMode

log = logging.getLogger(__name__)

ShapeKey = tuple[Hashable, ...]


def float_timestep(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The UNet's arguments with the timestep as float32.

    Euler-type schedulers step with float timesteps, DDIM/PNDM/DPM++ with int64 ones; the UNet
    turns either into float32 before its sinusoidal embedding (exact below 2**24), so one warmed
    graph serves every scheduler instead of one graph per timestep dtype.
    """
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        args = (args[0], args[1].to(torch.float32), *args[2:])
    elif isinstance(kwargs.get("timestep"), torch.Tensor):
        kwargs = {**kwargs, "timestep": kwargs["timestep"].to(torch.float32)}
    return args, kwargs


def tensor_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ShapeKey:
    """The shapes, dtypes and devices of every tensor argument: what a `dynamic=False` graph is specialised to."""
    values = [*args, *(kwargs[name] for name in sorted(kwargs))]
    return tuple(
        (tuple(value.shape), value.dtype, value.device.type) if isinstance(value, torch.Tensor) else None
        for value in values
    )


class ShapeGate:
    """Calls a module's compiled forward for warmed shapes and its eager forward for all others.

    Attributes:
        name: The module's name in logs and metrics ("unet", "vae_decoder").
        warmed: Shape keys that run compiled.
        learning: While true (the warm-up), a new shape is compiled and added to `warmed`.
        fallbacks: Calls that ran eagerly because their shape was not warmed.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        name: str,
        *,
        mode: CompileMode,
        backend: str | Callable[..., Any] = "inductor",
        max_shapes: int = 8,
        on_fallback: Callable[[str], None] | None = None,
        normalise: Callable[[tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
    ) -> None:
        if mode == "off":
            raise ValueError("a gate needs a compile mode")
        self.name = name
        self.eager: Callable[..., Any] = module.forward
        # Modes are inductor options; other backends (tests: aot_eager, a counting backend) take none.
        options: dict[str, Any] = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
        self.compiled: Callable[..., Any] = torch.compile(self.eager, backend=backend, dynamic=False, **options)
        self.max_shapes = max_shapes
        self.warmed: set[ShapeKey] = set()
        self.learning = False
        self.fallbacks = 0
        self.on_fallback = on_fallback
        self.normalise = normalise
        self._lock = threading.Lock()
        self._warned: set[ShapeKey] = set()
        self._module = module
        module.forward = self  # instance attribute: nn.Module.__call__ finds it before the class method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.normalise is not None:
            args, kwargs = self.normalise(args, kwargs)
        key = tensor_key(args, kwargs)
        if key in self.warmed:
            return self.compiled(*args, **kwargs)
        if self.learning and len(self.warmed) < self.max_shapes:
            with self._lock:
                self.warmed.add(key)
            log.info("compiling %s for %s", self.name, key)
            return self.compiled(*args, **kwargs)
        with self._lock:
            self.fallbacks += 1
            first = key not in self._warned
            self._warned.add(key)
        if first:
            log.warning("%s: shape %s was not warmed up; it runs eagerly (add it to the warm-up sizes)", self.name, key)
        if self.on_fallback is not None:
            self.on_fallback(self.name)
        return self.eager(*args, **kwargs)

    def remove(self) -> None:
        """Give the module its eager forward back."""
        del self._module.forward


class Accelerated:
    """What `accelerate` did to one pipeline's modules, and the gates to open during the warm-up."""

    def __init__(self, gates: list[ShapeGate]) -> None:
        self.gates = gates

    def learning(self, on: bool) -> None:
        """Open (warm-up) or close (serving) every gate to new shapes."""
        for gate in self.gates:
            gate.learning = on

    def set_fallback_counter(self, count: Callable[[str], None]) -> None:
        """Report each eager fallback of an unwarmed shape (e.g. to a metric)."""
        for gate in self.gates:
            gate.on_fallback = count


def accelerate(pipe: Any, settings: AccelerationSettings, device: str) -> Accelerated:
    """Apply channels_last, fused QKV and the gated torch.compile to a loaded pipeline's shared modules.

    Call once, after the pipeline is on its device; every per-run pipeline shares these modules.
    """
    if settings.fuse_qkv:
        # Self-attention gets one q/k/v matmul, cross-attention one k/v matmul (diffusers, experimental).
        pipe.fuse_qkv_projections()
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    gates: list[ShapeGate] = []
    shapes = len(settings.sizes_for(device)) * len(settings.warmup_batch_sizes)
    if settings.compile_unet != "off":
        gates.append(
            ShapeGate(
                pipe.unet,
                "unet",
                mode=settings.compile_unet,
                backend=settings.compile_backend,
                max_shapes=shapes,
                normalise=float_timestep,
            )
        )
    if settings.compile_vae_decoder != "off":
        gates.append(
            ShapeGate(
                pipe.vae.decoder,
                "vae_decoder",
                mode=settings.compile_vae_decoder,
                backend=settings.compile_backend,
                max_shapes=shapes,
            )
        )
    return Accelerated(gates)
