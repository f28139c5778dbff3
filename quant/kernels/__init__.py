"""Kernels: functions of arrays and ints only, one per (format, operation).

numba's default OpenMP threads spin-wait after each parallel region and starve the next
OpenBLAS call (measured 2-13x slower prefill); passive waiting costs nothing measurable in
decode. It must be set before the OpenMP runtime starts, hence here, on first import.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
