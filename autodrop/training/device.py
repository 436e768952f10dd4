"""Where a trial trains and the switches that make it fast there: device choice, memory layout,
mixed precision, evaluation chunk size, allocator tuning."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Any

import torch

from autodrop.config import PRECISIONS

EVAL_CHUNK = 1024  # images per forward pass when evaluating on a GPU; no gradients, so memory is small
# On a CPU a chunk's feature maps must fit the cache (benchmarks/README.md shows the cost of a chunk
# that does not): a CPU chunk holds this many input pixels, 128 images at 32x32, 32 at 64x64.
CPU_EVAL_PIXELS = 128 * 32 * 32
# The share of a GPU's free memory the images may take when --data-on-device is auto: the rest is
# for the networks, their activations and the allocator's slack (several packed members at once).
DEVICE_DATA_SHARE = 0.5


def resolve_device(name: str) -> torch.device:
    """Return the device ``name`` asks for; ``auto`` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def use_channels_last(device: torch.device) -> bool:
    """Whether to lay out images and conv weights channels-last on ``device`` (faster on CPU and CUDA)."""
    return device.type in ("cpu", "cuda")


def eval_chunk_size(device: torch.device, image_size: int) -> int:
    """Return how many ``image_size`` x ``image_size`` images to evaluate per forward pass on ``device``."""
    if device.type == "cpu":
        return max(1, CPU_EVAL_PIXELS // (image_size * image_size))
    return EVAL_CHUNK


def data_fits(device: torch.device, n_bytes: int) -> bool:
    """Whether ``n_bytes`` of images fit on ``device`` beside training (a CPU's images stay where they are)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return n_bytes <= DEVICE_DATA_SHARE * free
    return True


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Return ``batch`` on ``device``. A host batch bound for a GPU is copied from pinned memory
    without waiting, so the copy runs while the GPU still works on the step before; on a CPU the
    batch is returned as it is."""
    if batch.device.type != "cpu" or device.type == "cpu":
        return batch.to(device)
    pinned = device.type == "cuda"
    return (batch.pin_memory() if pinned else batch).to(device, non_blocking=pinned)


def native_bf16(device: torch.device) -> bool:
    """Return whether ``device`` computes bfloat16 matrix products in hardware.

    A CUDA GPU of compute capability 8.0 or later does; a CPU does when PyTorch reports AMX-BF16
    tiles or AVX512-BF16 instructions. Elsewhere bf16 is emulated, and slower than float32.
    """
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch before 2.5 counts only native support anyway
            return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        found = cpu_capabilities()
        return bool(found.get("amx_bf16") or found.get("avx512_bf16"))
    return False


def cpu_capabilities() -> dict[str, Any]:
    """Return what PyTorch reports about this CPU: its kernel level (``capability``: AVX2, AVX512...)
    and, where it can tell, ``amx_bf16`` and ``avx512_bf16``."""
    found: dict[str, Any] = {"capability": torch.backends.cpu.get_cpu_capability()}
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch 2.10 and later
    if capabilities is not None:
        found.update(capabilities())
        return found
    cpu = getattr(torch._C, "_cpu", None)
    for key, probe in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        if cpu is not None and hasattr(cpu, probe):
            found[key] = bool(getattr(cpu, probe)())
    return found


def resolve_precision(precision: str, device: torch.device) -> str:
    """Return the precision trials train in on ``device``: ``fp32`` or ``bf16`` as asked, and for
    ``auto`` bf16 where the device computes it natively (:func:`native_bf16`), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, but got {precision!r}.")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str = "auto") -> Any:
    """Return the autocast context for ``precision`` on ``device``: bf16 autocast, or none (fp32).

    The one place training and evaluation choose their arithmetic. Autocast computes convolutions
    and matrix products in bf16 while the weights, their gradients, the optimiser state and the
    batch-norm running statistics stay float32; the loops compute the loss on float32 logits.
    """
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def prepare_device(device: torch.device) -> None:
    """Set the process-wide switches that make training fast on ``device``."""
    if device.type == "cuda":
        # Every trial runs the same shapes: let cuDNN pick the fastest kernels once.
        torch.backends.cudnn.benchmark = True
    elif device.type == "cpu":
        _keep_freed_memory()


_ALLOCATOR_TUNED = False


def _keep_freed_memory() -> None:
    """Ask glibc to reuse freed activation memory instead of handing it back to the system.

    Every step allocates and frees the same tens of megabytes of activations. By default glibc
    serves such blocks with mmap and returns them on free, so each step faults every page in
    again (benchmarks/README.md counts them). Keeping them costs nothing extra at the peak: the
    process's resident size stays at its high-water mark.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
