"""Number format and memory layout of the networks: the one decision that training and CAM inference share.

:func:`compute_format` turns ``--mixed_precision`` and the device into an autocast dtype, a GradScaler need and a
memory format:

* CUDA: bf16 autocast where the GPU supports it, else fp16 with a GradScaler; channels-last images and weights.
* CPU with bf16 instructions (oneDNN reports them, e.g. AVX512-BF16 or AMX): bf16 autocast, channels-last. In
  channels-first layout bf16 convolutions were slower than fp32 ones on such a CPU (measured, README "Performance"),
  so bf16 always comes with channels-last on CPU.
* CPU without bf16: ``--mixed_precision true`` falls back to fp32 (emulated bf16 is slower than fp32).
* fp32 on CPU stays channels-first: channels-last brought no steady gain there, and the contiguous fp32 path is the
  one that reproduces the reference's CAMs bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_LOGGED: set[tuple[str, str]] = set()


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX512-BF16, AMX or similar)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private API: absent in some builds
        return False


@dataclass(frozen=True)
class ComputeFormat:
    """How the networks of a run compute.

    Attributes:
        device_type: ``"cpu"`` or ``"cuda"``.
        amp_dtype: autocast dtype, or None for plain fp32.
        needs_scaler: fp16 training needs a GradScaler.
        channels_last: networks and image batches in channels-last memory format.
        reason: why, in words, for the log.
    """

    device_type: str
    amp_dtype: torch.dtype | None
    needs_scaler: bool
    channels_last: bool
    reason: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to :attr:`amp_dtype`, or a no-op context for fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)

    def describe(self) -> str:
        dtype = "float32" if self.amp_dtype is None else f"{str(self.amp_dtype).replace('torch.', '')} autocast"
        layout = "channels_last" if self.channels_last else "contiguous (NCHW)"
        return f"{dtype}, {layout} on {self.device_type} ({self.reason})"


def compute_format(
    mixed_precision: bool, device: torch.device | str, channels_last: bool | None = None
) -> ComputeFormat:
    """Decide the autocast dtype, the scaler and the memory format (see the module docstring for the rules).

    Args:
        mixed_precision: the ``--mixed_precision`` flag.
        device: where the networks run.
        channels_last: force the memory format (None = the rule for this device and dtype).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not mixed_precision:
            dtype, scaler, reason = None, False, "--mixed_precision false"
        elif torch.cuda.is_bf16_supported():
            dtype, scaler, reason = torch.bfloat16, False, "the GPU supports bf16"
        else:
            dtype, scaler, reason = torch.float16, True, "the GPU has no bf16: fp16 with a GradScaler"
        layout = True
    elif not mixed_precision:
        dtype, scaler, layout, reason = None, False, False, "--mixed_precision false"
    elif device.type == "cpu" and cpu_supports_bf16():
        capability = torch.backends.cpu.get_cpu_capability()
        dtype, scaler, layout, reason = torch.bfloat16, False, True, f"native bf16 on this CPU, capability {capability}"
    else:
        dtype, scaler, layout = None, False, False
        reason = f"--mixed_precision true ignored: no native bf16 on this {device.type}, fp32 is faster"
    if channels_last is not None and bool(channels_last) != layout:
        layout, reason = bool(channels_last), f"{reason}; memory format forced by the caller"
    return ComputeFormat(device.type, dtype, scaler, layout, reason)


def log_compute_format(fmt: ComputeFormat, stage: str) -> None:
    """Log ``fmt`` once per process and stage (e.g. ``"training"``, ``"CAM inference"``)."""
    key = (stage, fmt.describe())
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("%s computes in %s", stage, fmt.describe())
