"""One kernel body, several compiled kernels: `variant` gives a plain Python function other callees.

Where two kernels differ only in the functions they call (Q4_0's tile and unpack against
Q5_0's), the body is written once as a plain function that calls them by global names, and
each kernel is a copy of it whose globals map those names to its own callees. numba reads a
global as a compile-time constant, as it reads any other kernel's call of `_t_q4_0`, so each
copy inlines its callees exactly as a hand-written kernel would: the same machine code.

Not the usual closure (a factory whose inner @njit calls the function it was given): numba's
disk cache keys a closure by pickling the cells it closes over, and a dispatcher or intrinsic
pickles with a uuid drawn anew in every process, so such a kernel misses the cache in every new
process and compiles again (NUMBA_DEBUG_CACHE=1 shows "data saved" on each start, the index
growing by one entry each time). A copy has no cells: numba keys it by its bytecode under its
own name (the cache file is named after `__qualname__`), so each variant is cached apart and
loaded on the next start.
"""

from __future__ import annotations

import types
from typing import Callable

from numba import njit


def variant(body: Callable, name: str, callees: dict[str, Callable], **jit) -> Callable:
    """body compiled by njit(**jit) as the kernel `name`, its global names `callees` bound to
    those functions. The globals are a copy of body's module's as they are now: make variants
    below every definition body uses."""
    g = {**body.__globals__, **callees}
    f = types.FunctionType(body.__code__, g, name, body.__defaults__, body.__closure__)
    f.__qualname__ = name
    f.__doc__ = body.__doc__
    return njit(**jit)(f)
