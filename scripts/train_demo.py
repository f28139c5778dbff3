"""Train the demo model: a small Qwen3 (the real architecture, tokenizer and 151,936-token
vocabulary, tied embeddings) on the synthetic chats of qwen3cli/demo/tasks.py, with torch on CPU.

    pip install -e '.[test]'        # torch (CPU) and transformers
    python scripts/train_demo.py --minutes 40 --out qwen3cli/data/demo

What keeps it affordable on two cores:
- the loss is taken on the assistant's reply only (the prompt is context);
- the model trains on the token ids the corpus uses (a few hundred rows of the embedding). Every
  other row is zero in the shipped model, so its logit is exactly 0; the training softmax adds
  that mass as one extra logit of log(number of unused tokens), so it equals the full
  vocabulary's softmax and nothing changes when the rows are put back;
- a first few minutes on one task alone, repeating a number: copying from the prompt is what
  every skill needs, and in the mix a small model took thousands of steps to find it (it
  learned the formats and wrote made-up digits); alone it learns it in a few hundred;
- batches of a fixed number of tokens (many short sums or a few long tool chats), AdamW with
  warm-up and cosine decay.
Seeds are fixed (data, initialisation, batches) and torch runs deterministic single-process
kernels, so the same command gives the same weights on the same machine and torch version.

Writes to --out: demo.safetensors (the compact weights: used ids, their embedding rows, the
layers, as bf16 bits), demo.json (config, training log: loss by step, time; and the accuracy
transformers measures on held-out problems, greedy, which tests/test_demo.py holds our engine to).
`--evaluate-only` measures the accuracy of the weights already in --out again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB = 151936
SEED = 1234


def model_config(n_vocab: int, args) -> dict:
    return dict(vocab_size=n_vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                head_dim=args.hidden // args.heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_theta=1_000_000.0, tie_word_embeddings=True, attention_bias=False, hidden_act="silu")


def encode(tok, template, s) -> tuple[list[int], list[int]]:
    prompt = template.render(s.messages, enable_thinking=s.think, tools=s.tools)
    p = tok.encode(prompt, add_special_tokens=False).ids
    t = tok.encode(s.target, add_special_tokens=False).ids
    return p + t, [0] * len(p) + [1] * len(t)


def used_ids(tok, template, seed: int, n: int) -> list[int]:
    """Every id the corpus uses, from n samples of it (the vocabulary of the tasks is small and
    closed: more samples add nothing), plus the digits and template tokens, whatever n is."""
    from qwen3cli.demo.tasks import BUDGET_NOTE, samples

    ids = set()
    for s in itertools.islice(samples(seed), n):
        ids.update(encode(tok, template, s)[0])
    for text in [str(d) for d in range(10)] + ["<think>", "</think>", "<tool_call>", "</tool_call>",
                                               "<tool_response>", "</tool_response>", "<|im_start|>",
                                               "<|im_end|>", "<|endoftext|>", "\n", "\n\n", " ", BUDGET_NOTE]:
        ids.update(tok.encode(text, add_special_tokens=False).ids)
    return sorted(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "qwen3cli" / "data" / "demo")
    ap.add_argument("--minutes", type=float, default=45.0, help="stop training after this long")
    ap.add_argument("--steps", type=int, default=5000, help="the schedule's length (stops earlier at --minutes)")
    ap.add_argument("--save-every", type=int, default=0, help="also write the weights every this many steps")
    ap.add_argument("--batch-tokens", type=int, default=3072, help="a batch is as many samples as fit this many "
                    "(padded) tokens: many short sums, a few long tool chats")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--echo-first", type=int, default=20000, help="samples of the repeat task alone before the mix")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=100, help="held-out problems per kind and thinking mode")
    ap.add_argument("--evaluate-only", action="store_true", help="measure the accuracy of --out's weights, no training")
    args = ap.parse_args()
    if args.evaluate_only:
        return record_accuracy(args.out, args.eval_n, args.threads)

    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qwen3cli.demo import compact
    from qwen3cli.demo.tasks import echoes, samples
    from qwen3cli.text.chat_template import ChatTemplate

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    tok = Tokenizer.from_file(str(compact.tokenizer_dir() / "tokenizer.json"))
    template = ChatTemplate(None)
    ids = used_ids(tok, template, SEED + 1, 4000)
    remap = np.full(VOCAB, -1, np.int64)
    remap[ids] = np.arange(len(ids))
    print(f"{len(ids)} token ids used", flush=True)

    cfg = Qwen3Config(**model_config(len(ids), args))
    cfg._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    unused = torch.tensor(math.log(VOCAB - len(ids)))
    stream = itertools.chain(itertools.islice(echoes(SEED), args.echo_first), samples(SEED))
    log, start, step, pending = [], time.time(), 0, []

    def write(step: int) -> None:
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        args.out.mkdir(parents=True, exist_ok=True)
        compact.save(args.out, np.asarray(ids, np.int32), state, model_config(VOCAB, args),
                     {"steps": step + 1, "seconds": round(time.time() - start), "batch_tokens": args.batch_tokens, "lr": args.lr,
                      "seed": SEED, "torch": torch.__version__, "loss": curve(log)})

    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        if not pending:  # batches of similar lengths: padding a 40-token sum to a 250-token tool chat wastes 80%
            pool = [encode(tok, template, s) for s in itertools.islice(stream, 512)]
            pool = sorted((e for e in pool if (remap[e[0]] >= 0).all()), key=lambda e: len(e[0]))  # (none is left out)
            pending = batches(pool, args.batch_tokens)
            random.Random(step).shuffle(pending)
        batch = pending.pop()
        n = max(len(t) for t, _ in batch)
        x = torch.zeros(len(batch), n, dtype=torch.long)
        m = torch.zeros(len(batch), n)
        for i, (t, mask) in enumerate(batch):
            x[i, :len(t)] = torch.from_numpy(remap[t])
            m[i, :len(t)] = torch.tensor(mask, dtype=torch.float32)
        h = model.model(input_ids=x).last_hidden_state[:, :-1]
        logits = h @ model.model.embed_tokens.weight.T
        logits = torch.cat([logits, unused.expand(*logits.shape[:2], 1)], dim=-1)  # the zero rows' mass
        nll = -torch.log_softmax(logits.float(), -1).gather(-1, x[:, 1:, None])[..., 0]
        w = m[:, 1:]
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append([step, round(time.time() - start, 1), round(loss.item(), 4)])
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            write(step)
        if time.time() - start > args.minutes * 60:
            break
    elapsed = time.time() - start
    write(step)
    print(f"trained {step + 1} steps in {elapsed / 60:.1f} min; wrote {args.out}")
    record_accuracy(args.out, args.eval_n, args.threads)


def batches(pool: list, budget: int) -> list[list]:
    """Cut a length-sorted pool into batches of at most `budget` padded tokens. Small batches
    of short samples are what kept attention from learning to copy: the gradient was all noise."""
    out, cur = [], []
    for e in pool:
        if cur and (len(cur) + 1) * len(e[0]) > budget:
            out.append(cur)
            cur = []
        cur.append(e)
    return out + [cur] if cur else out


def curve(log: list[list[float]], every: int = 50) -> list[list[float]]:
    """The loss by step as shipped: [last step, seconds, mean loss] per `every` steps (a batch's
    loss swings with its task: a bare sum is hard, a greeting easy)."""
    return [[log[min(i + every, len(log)) - 1][0], log[min(i + every, len(log)) - 1][1],
             round(sum(r[2] for r in log[i:i + every]) / len(log[i:i + every]), 4)] for i in range(0, len(log), every)]


KINDS = [("arith", True), ("arith", False), ("echo", False), ("tool_call", True), ("tool_call", False), ("tool_answer", False),
         ("hello", False)]


def record_accuracy(out: Path, n: int, threads: int) -> None:
    """Greedy accuracy of the weights in `out` on held-out problems, with transformers as the
    reference implementation, into demo.json's "accuracy" (kind/think|no_think -> fraction)."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qwen3cli.demo import compact
    from qwen3cli.demo.tasks import END, graded, held_out, reply_of
    from qwen3cli.text.chat_template import ChatTemplate

    torch.set_num_threads(threads)
    t = load_file(str(out / "demo.safetensors"))
    ids = t.pop(compact.IDS)
    info = json.loads((out / "demo.json").read_text())
    model = Qwen3ForCausalLM(Qwen3Config(**{**info["config"], "vocab_size": len(ids)})).eval()
    sd = {k: torch.from_numpy((v.astype(np.uint32) << 16).view(np.float32)) for k, v in t.items()}
    model.load_state_dict({**sd, "lm_head.weight": sd[compact.EMBED]})
    tok = Tokenizer.from_file(str(compact.tokenizer_dir() / "tokenizer.json"))
    template = ChatTemplate(None)
    remap = {int(i): j for j, i in enumerate(ids)}
    end = remap[tok.token_to_id(END)]
    acc = {}
    for kind, think in KINDS:
        right = 0
        for s in held_out(kind, think, n):
            p = tok.encode(template.render(s.messages, enable_thinking=think, tools=s.tools),
                           add_special_tokens=False).ids
            x = torch.tensor([[remap[i] for i in p]])
            with torch.no_grad():
                y = model.generate(x, max_new_tokens=300, do_sample=False, eos_token_id=end, pad_token_id=end)
            text = tok.decode([int(ids[i]) for i in y[0, x.shape[1]:]], skip_special_tokens=False)
            right += graded(reply_of(text), s)
        acc[f"{kind}/{'think' if think else 'no_think'}"] = round(right / n, 3)
        print(f"{kind} {'think' if think else 'no_think'}: {right}/{n}", flush=True)
    info["accuracy"] = {"n": n, "greedy": True, "reference": "transformers", **acc}
    (out / "demo.json").write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
