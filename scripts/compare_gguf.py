"""Compare two GGUF files: metadata keys and values, tensor names, shapes, types and bytes.

Used to hold our `quantize` output against llama.cpp's convert_hf_to_gguf.py +
llama-quantize on the same checkpoint:

    python scripts/compare_gguf.py ours.gguf theirs.gguf [--ignore-key general.name]

Exit status 0 when they agree (tensor order and byte differences in float tensors of
different origin are reported, not failed, unless --bytes is given).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quant.gguf_file import GGUFFile, StringArray  # noqa: E402


def _norm(v):
    if isinstance(v, StringArray):
        return list(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, float):
        return float(np.float32(v))
    return v


def compare(a_path: str, b_path: str, ignore: set[str], check_bytes: bool) -> int:
    a, b = GGUFFile(a_path), GGUFFile(b_path)
    bad = 0
    for k in sorted(set(a.metadata) | set(b.metadata)):
        if k in ignore:
            continue
        if k not in a.metadata or k not in b.metadata:
            print(f"KEY  {k}: only in {'first' if k in a.metadata else 'second'}")
            bad += 1
            continue
        va, vb = _norm(a.metadata[k]), _norm(b.metadata[k])
        if va != vb:
            short = lambda v: (repr(v)[:80] + "...") if len(repr(v)) > 80 else repr(v)  # noqa: E731
            print(f"KEY  {k}: {short(va)} != {short(vb)}")
            bad += 1
    names_a, names_b = list(a.tensors), list(b.tensors)
    for n in sorted(set(names_a) ^ set(names_b)):
        print(f"TENSOR {n}: only in {'first' if n in a.tensors else 'second'}")
        bad += 1
    same_bytes = 0
    for n in names_a:
        if n not in b.tensors:
            continue
        ta, tb = a.tensors[n], b.tensors[n]
        if ta.shape != tb.shape or ta.type != tb.type:
            print(f"TENSOR {n}: {list(ta.shape)} {ta.type_name} != {list(tb.shape)} {tb.type_name}")
            bad += 1
        elif np.array_equal(a.raw(n), b.raw(n)):
            same_bytes += 1
        elif check_bytes:
            diff = int((a.raw(n) != b.raw(n)).sum())
            print(f"BYTES {n} ({ta.type_name}): {diff} of {ta.nbytes} bytes differ")
            bad += 1
    if names_a != [n for n in names_b if n in a.tensors]:
        print("note: tensor order differs")
    print(f"{len(a.metadata)} / {len(b.metadata)} keys, {len(names_a)} / {len(names_b)} tensors, "
          f"{same_bytes} tensors byte-identical, {bad} differences")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--ignore-key", action="append", default=[])
    ap.add_argument("--bytes", action="store_true", help="also fail on tensors whose bytes differ")
    args = ap.parse_args()
    sys.exit(compare(args.first, args.second, set(args.ignore_key), args.bytes))


if __name__ == "__main__":
    main()
