"""Type names shared by the public API.

``Buffer`` is anything that exports the buffer protocol (bytes, bytearray,
memoryview, mmap...): ``collections.abc.Buffer`` on Python 3.12+,
``typing_extensions.Buffer`` before. ``ItemLike`` adds numpy arrays (numpy's
stubs declare their buffer export only for 3.12+). Type checkers then flag
``push("text")``.
"""

from __future__ import annotations

import sys
from typing import Any, Union

import numpy as np

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:  # pragma: no cover - depends on the interpreter
    from typing_extensions import Buffer

ItemLike = Union[Buffer, "np.ndarray[Any, Any]"]
"""What ``push`` takes: a buffer or a numpy array."""

__all__ = ["Buffer", "ItemLike"]
