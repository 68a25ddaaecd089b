"""Where the Triton kernels can run, and the choice between them and the PyTorch references.

Triton runs on CUDA tensors, and on CPU tensors only in Triton's interpreter (``TRITON_INTERPRET=1`` in the
environment before ``leap_kernels`` is imported: Triton reads it when a ``@triton.jit`` function is created).
Everywhere else the reference in ``leap_kernels/reference.py`` runs. Asking for ``backend="triton"`` where it
cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

from typing import Literal

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a declared dependency; this guards odd platforms
    HAVE_TRITON = False

Backend = Literal["auto", "triton", "reference"]
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was created by Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def use_triton(backend: Backend, kernel, *tensors: torch.Tensor) -> bool:
    """Decide whether ``kernel`` runs on ``tensors``; raise if ``backend="triton"`` was asked and it cannot."""
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend={backend!r} is not one of 'auto', 'triton', 'reference'")
    if backend == "reference":
        return False
    reason = None
    if not HAVE_TRITON:
        reason = "triton is not installed (pip install triton)"
    elif any(t.dtype not in TRITON_DTYPES for t in tensors):
        reason = f"dtype {tensors[0].dtype} has no Triton kernel (float32, float16 and bfloat16 do)"
    elif all(t.is_cuda for t in tensors):
        return True
    elif all(t.device.type == "cpu" for t in tensors):
        if is_interpreted(kernel):
            return True
        reason = "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing leap_kernels"
    else:
        reason = f"tensors on {sorted({str(t.device) for t in tensors})}: Triton needs CUDA (or CPU in interpreter)"
    if backend == "triton":
        raise RuntimeError(f"backend='triton' cannot run here: {reason}; use backend='auto' or 'reference'")
    return False
