"""Kernels: functions of arrays and ints only, one per (format, operation).

numba's OpenMP threads spin-wait after each parallel region (GNU default: 300,000 spins); an
OpenBLAS pool working beside them is starved (measured 2-13x slower prefill). So numpy's
OpenBLAS is pinned to one thread here and prefill splits its products over threads of our
own (threads.py); numba keeps its default spin, which decode's ~150 launches a token want.
Where numpy's BLAS is not OpenBLAS (cannot be pinned), a short spin (GOMP_SPINCOUNT=1000)
serves both as before. Either must happen before the OpenMP runtime starts, hence here, on
first import; a value the user set wins.
"""

import os

from .threads import pin_blas

BLAS_PINNED = pin_blas()
if not BLAS_PINNED and "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
