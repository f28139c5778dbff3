"""Kernels: functions of arrays and ints only, one per (format, operation)."""
