"""Shared test set-up.

Triton kernels run on CPU through Triton's interpreter. The flag is read when a ``@triton.jit`` function is
created, so it must be in the environment before ``kernels`` is first imported: set it here, at the top of the
root conftest, which pytest imports before any test module.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
