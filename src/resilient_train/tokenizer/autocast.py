"""The precisions the tokenizer runs in, and whether a device can run one: shared by training and the tools.

``32`` runs in float32 with no autocast; ``bf16-mixed`` and ``16-mixed`` run the forward passes under
``torch.autocast`` with bfloat16 or float16, the weights staying float32. :func:`check_precision` refuses,
before any model is built, a name that is not one of these and a precision the device cannot run
(saying why); :func:`autocast` is the context the forward passes run in. The gradient scalers that
training in ``16-mixed`` adds live with the loop (``train.precision``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["PRECISIONS", "autocast", "check_precision"]

#: The precisions and the autocast dtype of each (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


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


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The forward passes' context in ``precision`` on ``device`` (nothing for ``32``)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield
