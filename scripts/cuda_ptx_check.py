"""Compile every CUDA kernel to PTX for a GPU architecture, without a GPU (needs NVVM, e.g.
`pip install 'numba-cuda[cu13]'`): the check that the kernels the simulator runs as Python
also type and compile for the device.

    python scripts/cuda_ptx_check.py [--cc 9.0] [--ir]

Prints one line per kernel and exits 1 on the first failure; exits 2 when NVVM is missing.
--ir stops at numba's LLVM IR, which needs no CUDA toolkit: every kernel typed and lowered for
the device (casts, float16, device functions), the part of the compile the simulator skips;
NVVM's own checks and the link (an unresolved runtime call) need the full compile.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def signatures():
    from numba import types as t

    f1, f2, f3, f4 = t.float32[:], t.float32[:, :], t.float32[:, :, :], t.float32[:, :, :, :]
    i1, u2, i82, h2 = t.int32[:], t.uint8[:, :], t.int8[:, :], t.float16[:, :]
    ix, f, b = t.int64, t.float32, t.boolean
    h4 = t.float16[:, :, :, :]  # q8_0 scales (a dummy for the other cache types)
    caches = (f4, h4, t.int8[:, :, :, :])  # the KV cache's f32, f16, q8_0
    return {
        "mv_float": [(f2, ix, i1, f2, b, f2), (f2, ix, i1, h2, b, f2)],
        "mv_i8": [(f2, ix, i1, i82, f2, ix, f2, b, f2)],
        "mv_q4": [(f2, ix, i1, u2, f2, f2, f, b, f2)],
        "mv_q2_k": [(f2, ix, i1, u2, u2, u2, f2, b, f2)],
        "mv_q3_k": [(f2, ix, i1, u2, u2, i82, f2, b, f2)],
        "rms_norm": [(f2, f1, f, f2)],
        "qkv_rope_store": [(f2, f2, f2, f1, f1, f, f2, f2, ix, ix, f3, f3, c, c, h4, h4, b) for c in caches],
        "attention": [(f3, c, c, h4, h4, b, b, ix, ix, ix, f, f3, f2) for c in caches],
        "silu_mul": [(f2, f2, f2)],
        "route": [(f2, ix, t.boolean, f2, i1, f1)],
        "weighted_sum": [(f2, f1, ix, b, f2)],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cc", default="9.0")
    ap.add_argument("--ir", action="store_true", help="stop at LLVM IR (no NVVM needed)")
    opts = ap.parse_args()
    cc = tuple(int(x) for x in opts.cc.split("."))
    from types import SimpleNamespace

    import numba
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda

    from quant.kernels import cuda as K

    # device functions called from a kernel are compiled for "the current device": with no GPU,
    # say it is the architecture asked for
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)

    if opts.ir:
        from numba.cuda.compiler import compile_cuda

        for name, sigs in signatures().items():
            for sig in sigs:
                try:
                    ir = compile_cuda(getattr(K, name).py_func, numba.types.void, sig, cc=cc).library.get_llvm_str()
                except Exception as e:
                    print(f"{name}{sig}: FAILED: {type(e).__name__}: {e}")
                    return 1
                print(f"{name}: {len(ir.splitlines())} lines of LLVM IR for sm_{cc[0]}{cc[1]}")
        return 0

    def trivial(a):
        a[0] = 1.0

    try:  # the toolchain itself: a failure here is not our kernels' fault
        cuda.compile_ptx(trivial, (numba.types.float32[:],), cc=cc)
    except Exception as e:
        print(f"no CUDA compiler here (NVVM): {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        return 2
    for name, sigs in signatures().items():
        for sig in sigs:
            try:
                ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, sig, cc=cc)
            except Exception as e:
                print(f"{name}{sig}: FAILED: {type(e).__name__}: {e}")
                return 1
            print(f"{name}: {len(ptx.splitlines())} lines of PTX for sm_{cc[0]}{cc[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
