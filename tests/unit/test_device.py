from __future__ import annotations

import sys

import pytest

from kiln_runtime.device import (
    DeviceAvailability,
    DeviceChoice,
    DeviceUnavailable,
    choose_device,
    probe_devices,
)
from kiln_runtime.settings import CudaDtype, DevicePolicy

# policy, cuda present, mps present, cuda_dtype -> (device, dtype) or the exception raised.
# Written out rather than computed so that the table, not the implementation, is the spec.
# A machine with CUDA here supports bfloat16; the unsupported case has its own tests below.
TABLE: list[tuple[DevicePolicy, bool, bool, CudaDtype, tuple[str, str] | type[Exception]]] = [
    ("auto", True, True, "float16", ("cuda", "float16")),
    ("auto", True, True, "bfloat16", ("cuda", "bfloat16")),
    ("auto", True, False, "float16", ("cuda", "float16")),
    ("auto", True, False, "bfloat16", ("cuda", "bfloat16")),
    ("auto", False, True, "float16", ("mps", "float32")),
    ("auto", False, True, "bfloat16", ("mps", "float32")),
    ("auto", False, False, "float16", ("cpu", "float32")),
    ("auto", False, False, "bfloat16", ("cpu", "float32")),
    ("cuda", True, True, "float16", ("cuda", "float16")),
    ("cuda", True, True, "bfloat16", ("cuda", "bfloat16")),
    ("cuda", True, False, "float16", ("cuda", "float16")),
    ("cuda", True, False, "bfloat16", ("cuda", "bfloat16")),
    ("cuda", False, True, "float16", DeviceUnavailable),
    ("cuda", False, True, "bfloat16", DeviceUnavailable),
    ("cuda", False, False, "float16", DeviceUnavailable),
    ("cuda", False, False, "bfloat16", DeviceUnavailable),
    ("mps", True, True, "float16", ("mps", "float32")),
    ("mps", True, True, "bfloat16", ("mps", "float32")),
    ("mps", True, False, "float16", DeviceUnavailable),
    ("mps", True, False, "bfloat16", DeviceUnavailable),
    ("mps", False, True, "float16", ("mps", "float32")),
    ("mps", False, True, "bfloat16", ("mps", "float32")),
    ("mps", False, False, "float16", DeviceUnavailable),
    ("mps", False, False, "bfloat16", DeviceUnavailable),
    ("cpu", True, True, "float16", ("cpu", "float32")),
    ("cpu", True, True, "bfloat16", ("cpu", "float32")),
    ("cpu", True, False, "float16", ("cpu", "float32")),
    ("cpu", True, False, "bfloat16", ("cpu", "float32")),
    ("cpu", False, True, "float16", ("cpu", "float32")),
    ("cpu", False, True, "bfloat16", ("cpu", "float32")),
    ("cpu", False, False, "float16", ("cpu", "float32")),
    ("cpu", False, False, "bfloat16", ("cpu", "float32")),
]


def test_table_covers_every_combination() -> None:
    combos = {row[:4] for row in TABLE}
    assert len(combos) == len(TABLE) == 4 * 2 * 2 * 2


@pytest.mark.parametrize(
    ("policy", "cuda", "mps", "cuda_dtype", "expected"),
    TABLE,
    ids=[f"{p}-cuda{int(c)}-mps{int(m)}-{d}" for p, c, m, d, _ in TABLE],
)
def test_choose_device_table(
    policy: DevicePolicy,
    cuda: bool,
    mps: bool,
    cuda_dtype: CudaDtype,
    expected: tuple[str, str] | type[Exception],
) -> None:
    available = DeviceAvailability(cuda=cuda, mps=mps, bf16_supported=cuda)
    if isinstance(expected, tuple):
        assert choose_device(policy, cuda_dtype, available) == DeviceChoice(*expected)  # type: ignore[arg-type]
    else:
        with pytest.raises(expected):
            choose_device(policy, cuda_dtype, available)


@pytest.mark.parametrize("policy", ["auto", "cuda"])
def test_bfloat16_without_support_is_an_error_not_a_fallback(policy: DevicePolicy) -> None:
    available = DeviceAvailability(cuda=True, mps=True, bf16_supported=False)
    with pytest.raises(ValueError, match="bfloat16") as info:
        choose_device(policy, "bfloat16", available, setting_name="img2img.runtime.device")
    message = str(info.value)
    assert "img2img.runtime.cuda_dtype" in message
    assert "KILN_IMG2IMG__RUNTIME__CUDA_DTYPE" in message
    assert "float16" in message
    assert not isinstance(info.value, DeviceUnavailable)


def test_float16_without_bf16_support_is_fine() -> None:
    available = DeviceAvailability(cuda=True, mps=False, bf16_supported=False)
    assert choose_device("cuda", "float16", available) == DeviceChoice("cuda", "float16")


def test_bf16_support_irrelevant_off_cuda() -> None:
    available = DeviceAvailability(cuda=False, mps=False, bf16_supported=False)
    assert choose_device("auto", "bfloat16", available) == DeviceChoice("cpu", "float32")


def test_unavailable_message_names_request_presence_and_setting() -> None:
    available = DeviceAvailability(cuda=False, mps=True)
    with pytest.raises(DeviceUnavailable) as info:
        choose_device("cuda", "float16", available, setting_name="mesh.runtime.device")
    message = str(info.value)
    assert "'cuda'" in message  # what was asked
    assert "mps, cpu" in message  # what is present
    assert "mesh.runtime.device" in message  # which setting
    assert "KILN_MESH__RUNTIME__DEVICE" in message
    assert isinstance(info.value, RuntimeError)


def test_default_setting_name_shows_env_placeholder() -> None:
    with pytest.raises(DeviceUnavailable) as info:
        choose_device("mps", "float16", DeviceAvailability(cuda=False, mps=False))
    assert "runtime.device" in str(info.value)
    assert "KILN_<SERVICE>__RUNTIME__DEVICE" in str(info.value)


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"runtime\.device"):
        choose_device("tpu", "float16", DeviceAvailability(cuda=True, mps=True))  # type: ignore[arg-type]


def test_probe_devices_matches_torch() -> None:
    # On the CPU-only development machine this is cuda=False; compared with torch rather than
    # hard-coded so the suite also passes on a GPU runner.
    torch = pytest.importorskip("torch")
    available = probe_devices()
    assert available.cuda is torch.cuda.is_available()
    assert available.mps is torch.backends.mps.is_available()
    if not available.cuda:
        assert available.bf16_supported is False


def test_probe_devices_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import torch` raise ImportError.
    monkeypatch.setitem(sys.modules, "torch", None)
    assert probe_devices() == DeviceAvailability(cuda=False, mps=False, bf16_supported=False)
