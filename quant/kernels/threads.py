"""Prefill's parallelism: our own threads, each running single-threaded BLAS on its share.

numba's OpenMP workers spin after every parallel region (decode runs ~150 of them a token)
and an OpenBLAS pool spinning beside them starves both (FEASIBILITY.md). So numpy's OpenBLAS
is pinned to one thread (`pin_blas`, at import of quant.kernels), numba keeps the cores for
decode with its default spin, and the large products of prefill split their rows over a pool
of Python threads (BLAS and the nogil dequantizers release the GIL). Measured on 2 cores
against OpenBLAS's own threads with a short OpenMP spin: decode +7-8%, prefill the same
(scripts/bench_vs_llamacpp.py; numbers in the README).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

_POOL: list = [None, 0]


def pin_blas() -> bool:
    """Set numpy's BLAS to one thread (OpenBLAS, MKL, BLIS or FlexiBLAS, whichever numpy
    loaded: threadpoolctl finds it); False when it found none it can set."""
    import numpy  # noqa: F401  (threadpoolctl sees only libraries already loaded)
    from threadpoolctl import threadpool_limits

    return bool(threadpool_limits(limits=1, user_api="blas").get_original_num_threads().get("blas"))


def parts() -> int:
    import numba

    return numba.get_num_threads()


def run(fn: Callable[[int, int], None], n: int | None = None) -> None:
    """fn(i, n) for i in 0..n-1 on the pool (n: the numba thread count, --threads); errors propagate."""
    n = parts() if n is None else n
    if n <= 1:
        fn(0, 1)
        return
    if _POOL[1] < n:
        if _POOL[0] is not None:
            _POOL[0].shutdown(wait=False)
        _POOL[0], _POOL[1] = ThreadPoolExecutor(n, thread_name_prefix="qwen3cli-prefill"), n
    for f in [_POOL[0].submit(fn, i, n) for i in range(n)]:
        f.result()
