"""The precisions the tokenizer runs in, and whether a device can run one: shared by training and the tools.

``32`` runs in float32 with no autocast; ``bf16-mixed`` and ``16-mixed`` run the forward passes under
``torch.autocast`` with bfloat16 or float16, the weights staying float32. :func:`check_precision` refuses,
before any model is built, a name that is not one of these and a precision the device cannot run
(saying why), and logs how fast the device's convolutions are in it (:func:`conv_speed`): a CPU
without float16 kernels runs them two orders of magnitude slower than float32, which is allowed but
never silent (``precision.slow_kernels``). :func:`autocast` is the context the forward passes run in.
The gradient scalers that training in ``16-mixed`` adds live with the loop (``train.precision``).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterator

import torch

__all__ = ["PRECISIONS", "SLOW_KERNELS", "autocast", "check_precision", "conv_speed"]

log = logging.getLogger(__name__)

#: The precisions and the autocast dtype of each (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
#: Below this speed relative to float32 (:func:`conv_speed`) a precision's convolutions are "slow": warned about.
SLOW_KERNELS = 0.5


def check_precision(precision: str, device: torch.device, name: str = "trainer.precision") -> None:
    """Raise ``ValueError`` when ``device`` cannot run ``precision`` (``name``: the key or flag, for the message)."""
    if precision not in PRECISIONS:
        raise ValueError(f"{name}={precision!r}: must be one of {list(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"{name}=bf16-mixed: {torch.cuda.get_device_name(device)} has no bfloat16 support; use 16-mixed or 32"
        )
    try:  # what autocast on this device does with this dtype, tried once on a tiny matmul
        a = torch.ones(2, 2, device=device)
        with torch.autocast(device.type, dtype=dtype):
            (a @ a).sum().item()
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name}={precision}: autocast to {dtype} fails on {device}: {exc}") from exc
    speed = conv_speed(precision, device)
    if speed < SLOW_KERNELS:
        log.warning(
            "precision.slow_kernels %s=%s device=%s conv_speed=%.3g: its convolutions run %.0fx slower than float32 "
            "here (no fast %s kernels), and a step will be slower; 32 or bf16-mixed may be faster",
            name,
            precision,
            device.type,
            speed,
            1 / speed,
            dtype,
        )
    else:
        log.info("precision.kernels %s=%s device=%s conv_speed=%.3g", name, precision, device.type, speed)


def conv_speed(
    precision: str, device: torch.device, shape: tuple[int, ...] = (1, 32, 4, 16, 16), reps: int = 3
) -> float:
    """How fast a 3x3x3 convolution (forward and backward) on ``shape`` runs under ``precision``'s autocast,
    relative to float32: median float32 seconds / median seconds in ``precision`` (above 1: faster)."""
    conv = torch.nn.Conv3d(shape[1], shape[1], 3, padding=1).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)

    def once(p: str) -> float:
        t0 = time.perf_counter()
        with autocast(p, device):
            y = conv(x)
        y.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once("32"), once(precision)  # warm-up
    f32, here = zip(*((once("32"), once(precision)) for _ in range(reps)))
    return statistics.median(f32) / statistics.median(here)


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The forward passes' context in ``precision`` on ``device`` (nothing for ``32``)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield
