"""Sum up a hostile-input run: cases, worst time and worst peak memory per test.

    QWEN3CLI_HOSTILE_LOG=/tmp/hostile.jsonl python -m pytest -q tests/test_hostile_cli.py
    python scripts/hostile_report.py /tmp/hostile.jsonl

Cases run in a child process (tests/hostile.run_cli, under RLIMIT_AS) have a peak RSS; cases
run in-process (run_main) have a time only.
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows = defaultdict(list)
    for line in open(path):
        r = json.loads(line)
        rows[r["test"].split("::")[-1].split("[")[0]].append(r)
    print(f"{'test':<58} {'cases':>5} {'worst s':>8} {'worst MB':>9}  worst case (by time)")
    for test, rs in sorted(rows.items()):
        worst = max(rs, key=lambda r: r["seconds"])
        peaks = [r["peak_mb"] for r in rs if r["peak_mb"] is not None]
        peak = f"{max(peaks):.0f}" if peaks else "-"
        print(f"{test:<58} {len(rs):>5} {worst['seconds']:>8.2f} {peak:>9}  {' '.join(worst['args'])[:70]}")


if __name__ == "__main__":
    main(sys.argv[1])
