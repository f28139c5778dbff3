"""Kernels: functions of arrays and ints only, one per (format, operation).

numba's OpenMP threads spin-wait after each parallel region (GNU default: 300,000 spins) and
starve the OpenBLAS call that follows in prefill (measured 2-13x slower); sleeping at once
(OMP_WAIT_POLICY=PASSIVE) makes each of decode's ~150 launches per token wake threads from
the OS. A short spin serves both: on the 0.6B Q8_0 file, 2 threads, tokens/s prefill/decode:
passive 140/31, GOMP_SPINCOUNT=1000 163/41, 20000 123/35 (medians, scripts/bench_run.py
style). It must be set before the OpenMP runtime starts, hence here, on first import; a
value the user set wins.
"""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
