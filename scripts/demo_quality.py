"""Quantization quality on the demo model, a trained model with a real distribution (random
weights amplify noise): each type against the BF16 checkpoint, as llama-perplexity
--kl-divergence measures it, and task accuracy on held-out problems (greedy).

    python scripts/demo_quality.py                 # the README's table
    python scripts/demo_quality.py --n 100 --types q8_0 q4_k_m

Prints the host CPU, then one markdown row per type.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TYPES = ["bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
TASKS = [("arith", True), ("arith", False), ("tool_call", False), ("tool_answer", False)]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def task_accuracy(engine, kind: str, think: bool, n: int) -> float:
    from qwen3cli import api
    from qwen3cli.demo.tasks import accuracy

    def reply(s):
        return api.generate(engine, s.messages, think=think, tools=s.tools, temperature=0, max_tokens=300).text

    return accuracy(reply, kind, think, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--n", type=int, default=100, help="held-out problems per task")
    ap.add_argument("--chats", type=int, default=60, help="held-out chats in the KL text")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from qwen3cli import api
    from qwen3cli.demo import compact
    from qwen3cli.demo.tasks import chat_text
    from qwen3cli.io import convert
    from qwen3cli.runtime.evaluate import evaluate

    work = args.workdir or Path(tempfile.mkdtemp(prefix="demo-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    src = compact.checkpoint(work)
    ref = api.load(src, quant="bf16", ctx=1024)
    text = chat_text(args.chats)
    print(f"CPU: {cpu_name()}; {args.n} held-out problems per task, greedy; KL over {args.chats} held-out chats")
    print("| type | file MB | PPL (BF16) | KL mean | KL p99 | top-1 | " +
          " | ".join(f"{k} {'think' if t else 'no think'}" for k, t in TASKS) + " |")
    print("|---" * (6 + len(TASKS)) + "|")
    for t in args.types:
        out = work / f"demo-{t}.gguf"
        if not out.exists():
            convert.quantize(src, out, t)
        m = api.load(out, ctx=1024)
        t0 = time.time()
        r = evaluate(m, ref, text, 256)
        acc = [task_accuracy(m, k, think, args.n) for k, think in TASKS]
        print(f"| {t.upper()} | {out.stat().st_size / 1e6:.1f} | {r.ppl:.3f} ({r.ref_ppl:.3f}) | {r.kl_mean:.5f} | "
              f"{r.kl_p99:.4f} | {100 * r.top1:.1f}% | " + " | ".join(f"{100 * a:.0f}%" for a in acc) +
              f" |  <!-- {time.time() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
