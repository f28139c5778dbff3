"""--device auto|cpu|cuda: which backend runs the model, chosen once at load."""

from __future__ import annotations

import importlib.util

from ..errors import Qwen3CliError

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(Qwen3CliError):
    """The device asked for cannot be used."""


def _driver_present() -> bool:
    """Whether the NVIDIA driver library loads: milliseconds, where asking numba.cuda takes
    half a second (paid on every start of a machine without a GPU otherwise)."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def cuda_unusable() -> str | None:
    """Why the CUDA backend cannot run here, or None when it can."""
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed (pip install 'qwen3cli[cuda]')"
    from numba import config

    if config.ENABLE_CUDASIM:
        return None
    if not _driver_present():
        return "no NVIDIA driver found (libcuda)"
    try:
        from numba import cuda
        if not cuda.is_available():
            return "no CUDA GPU found"
    except Exception as e:  # a broken driver or toolkit: say what it said
        return f"CUDA failed to start: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def pick(device: str) -> tuple[str, str | None]:
    """(backend, note): the backend to build, and a line to show when auto fell back to the CPU
    although the cuda extra is installed and an NVIDIA driver is present. auto never
    picks numba's CUDA simulator (a test tool, 10^5 times slower); --device cuda does."""
    if device not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return "cpu", None
    why = cuda_unusable()
    if device == "cuda":
        if why is not None:
            raise DeviceError(f"--device cuda: {why}")
        return "cuda", None
    from numba import config

    if why is None and not config.ENABLE_CUDASIM:
        return "cuda", None
    # a line only where a GPU could have been meant: the extra installed and a driver present
    # (no driver: nobody expects this machine to use a GPU, so every command saying so is noise)
    quiet = config.ENABLE_CUDASIM or importlib.util.find_spec("numba_cuda") is None or not _driver_present()
    return "cpu", None if quiet else f"running on the CPU: {why}"
