"""IEEE half-precision scales read inside numba kernels."""

import math

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def half(lo, hi):
    """IEEE half from its two little-endian bytes (numba has no float16 on the CPU)."""
    h = np.int32(lo) | (np.int32(hi) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = math.ldexp(np.float64(m), -24)
    elif e == 31:
        v = math.inf if m == 0 else math.nan
    else:
        v = math.ldexp(np.float64(m | 1024), e - 25)
    return np.float32(-v if h & 0x8000 else v)
