"""lm-evaluation-harness against a running `qwen3cli serve`: a tiny local task, scored both ways
lm-eval talks to OpenAI-compatible servers, to check the interface end to end (not the model).

    qwen3cli serve MODEL.gguf --no-think &          # --no-think: short answers fit max_gen_toks
    python scripts/interop_lm_eval.py --base-url http://127.0.0.1:8080 [--limit 4]

- local-completions: the multiple-choice task (loglikelihood: prompt token ids, echo and
  logprobs on /v1/completions) and the generation task (generate_until);
- local-chat-completions: the generation task through /v1/chat/completions (lm-eval scores
  loglikelihood on completions only).

The task's questions are interop_lm_eval.json, beside this script. It prints each task's metrics
and exits 1 unless every run finished with finite numbers; without lm-eval installed it says so
and exits 0 (`pip install lm-eval` to run it). The tokenizer for the token ids is the package's
own copy of Qwen3's (qwen3cli/data/qwen3-tokenizer), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "interop_lm_eval.json"
TOKENIZER = HERE.parent / "qwen3cli" / "data" / "qwen3-tokenizer"

MC_TASK = """task: qwen3cli_interop_mc
dataset_path: json
dataset_kwargs:
  data_files: {data}
  field: multiple_choice
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_TASK = """task: qwen3cli_interop_gen
dataset_path: json
dataset_kwargs:
  data_files: {data}
  field: generate_until
test_split: train
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""


def model_id(base_url: str) -> str:
    with urllib.request.urlopen(base_url.rstrip("/") + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def numbers(results: dict, task: str) -> dict[str, float]:
    """The task's metrics (lm-eval keys them 'acc,none', 'acc_stderr,none'...)."""
    got = results["results"][task]
    return {k: float(v) for k, v in got.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run(lm_eval, task_manager, model: str, model_args: str, tasks: list[str], limit: int, chat: bool) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit,
                                   task_manager=task_manager, batch_size=1, apply_chat_template=chat,
                                   log_samples=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8080", help="the running serve (without /v1)")
    ap.add_argument("--limit", type=int, default=4, help="questions per task")
    a = ap.parse_args()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        print("lm-eval is not installed (pip install lm-eval); nothing was run.")
        return 0
    base = a.base_url.rstrip("/")
    model = model_id(base)
    failures = []
    with tempfile.TemporaryDirectory(prefix="qwen3cli-lm-eval-") as tmp:
        for name, text in (("mc.yaml", MC_TASK), ("gen.yaml", GEN_TASK)):
            (Path(tmp) / name).write_text(text.format(data=json.dumps(str(DATA))))
        tm = TaskManager(include_path=tmp)
        common = f"model={model},tokenizer_backend=huggingface,tokenizer={TOKENIZER},max_retries=1,num_concurrent=1"
        runs = [
            ("local-completions", f"base_url={base}/v1/completions,tokenized_requests=True,{common}",
             ["qwen3cli_interop_mc", "qwen3cli_interop_gen"], False),
            ("local-chat-completions", f"base_url={base}/v1/chat/completions,tokenized_requests=False,{common}",
             ["qwen3cli_interop_gen"], True),
        ]
        for lm, args, tasks, chat in runs:
            try:
                results = run(lm_eval, tm, lm, args, tasks, a.limit, chat)
            except Exception as e:  # a script: say what failed and go on to the next run
                failures.append(f"{lm}: {type(e).__name__}: {e}")
                continue
            for task in tasks:
                got = numbers(results, task)
                ok = bool(got) and all(math.isfinite(v) for v in got.values())
                print(f"{lm:24} {task:22} {'ok  ' if ok else 'FAIL'} {got}")
                if not ok:
                    failures.append(f"{lm} {task}: no finite metrics in {results['results'][task]}")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
