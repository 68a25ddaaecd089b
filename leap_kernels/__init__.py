"""Fused Triton kernels for LeapAlign's connector and similarity weight, with PyTorch references.

Dispatch (``leap_kernels.dispatch``): Triton on CUDA tensors, and on CPU under ``TRITON_INTERPRET=1``; the reference
in ``leap_kernels.reference`` everywhere else.
"""

from leap_kernels.connector import leap_connector
from leap_kernels.similarity import similarity_weight

__all__ = ["leap_connector", "similarity_weight"]
