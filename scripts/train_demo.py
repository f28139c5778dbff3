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
- short sequences, small batches, AdamW with warm-up and cosine decay.
Seeds are fixed (data, initialisation, batches) and torch runs deterministic single-process
kernels, so the same command gives the same weights on the same machine and torch version.

Writes to --out: demo.safetensors (the compact weights: used ids, their embedding rows, the
layers, as bf16 bits), demo.json (config, training log: loss by step, time, accuracy) .
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
    from qwen3cli.demo.tasks import samples

    ids = set()
    for s in itertools.islice(samples(seed), n):
        ids.update(encode(tok, template, s)[0])
    for text in [str(d) for d in range(10)] + ["<think>", "</think>", "<tool_call>", "</tool_call>",
                                               "<tool_response>", "</tool_response>", "<|im_start|>",
                                               "<|im_end|>", "<|endoftext|>", "\n", "\n\n", " "]:
        ids.update(tok.encode(text, add_special_tokens=False).ids)
    return sorted(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "qwen3cli" / "data" / "demo")
    ap.add_argument("--minutes", type=float, default=40.0, help="stop training after this long")
    ap.add_argument("--steps", type=int, default=4000, help="the schedule's length (stops earlier at --minutes)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qwen3cli.demo import compact
    from qwen3cli.demo.tasks import samples
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
    stream = samples(SEED)
    log, start, step, pending = [], time.time(), 0, []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        if not pending:  # batches of similar lengths: padding a 40-token sum to a 250-token tool chat wastes 80%
            pool = sorted((encode(tok, template, s) for s in itertools.islice(stream, args.batch * 16)),
                          key=lambda e: len(e[0]))
            pending = [pool[i:i + args.batch] for i in range(0, len(pool), args.batch)]
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
        if time.time() - start > args.minutes * 60:
            break
    elapsed = time.time() - start
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    args.out.mkdir(parents=True, exist_ok=True)
    compact.save(args.out, np.asarray(ids, np.int32), state, model_config(VOCAB, args),
                 {"steps": step + 1, "seconds": round(elapsed), "batch": args.batch, "lr": args.lr, "seed": SEED,
                  "torch": torch.__version__, "loss": log})
    print(f"trained {step + 1} steps in {elapsed / 60:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    main()
