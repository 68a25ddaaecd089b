"""Fused Triton kernels for LeapAlign's connector and similarity weight, with PyTorch references.

Dispatch (``kernels.dispatch``): Triton on CUDA tensors, and on CPU under ``TRITON_INTERPRET=1``; the reference
in ``kernels.reference`` everywhere else.
"""

from kernels.connector import leap_connector
from kernels.similarity import similarity_weight

__all__ = ["leap_connector", "similarity_weight"]
