"""Quantization quality: a model against a reference on the same text, like
`llama-perplexity --kl-divergence`: both perplexities, KL(reference || model) per token
(mean and 99th percentile) and how often their most likely next token agrees.

The text is cut into chunks of `ctx` tokens; in each chunk the first half is context and the
second half is scored, as llama-perplexity does, so every scored token sees at least ctx/2
tokens before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

import numpy as np

from ..errors import Qwen3CliError
from ..sampler import log_softmax
from .engine import Engine


class EvalError(Qwen3CliError):
    """The evaluation cannot run (text too short, models with different vocabularies)."""


@dataclass
class EvalResult:
    tokens: int  # scored tokens
    ppl: float
    ref_ppl: float
    kl_mean: float
    kl_p99: float
    top1: float  # fraction of positions where the argmaxes agree
    warnings: list[str] = field(default_factory=list)  # the two are not one model in two precisions

    def line(self) -> str:
        return (f"PPL {self.ppl:.4g} (reference {self.ref_ppl:.4g}), KL mean {self.kl_mean:.4g} "
                f"p99 {self.kl_p99:.4g}, top-1 agreement {100 * self.top1:.1f}% over {self.tokens} tokens")


def sample_text() -> str:
    return resources.files("qwen3cli").joinpath("data/eval_sample.txt").read_text(encoding="utf-8")


SHAPE = (("architecture", "arch"), ("layers", "n_layers"), ("hidden size", "hidden_size"), ("heads", "n_heads"),
         ("KV heads", "n_kv_heads"), ("experts", "n_experts"))
LOW_AGREEMENT = 0.3  # quantizations of one model agree on most tokens (Q4_0 of a 0.6B: ~90%)


def unrelated(model: Engine, ref: Engine) -> list[str]:
    """Why MODEL and REF look like two different models rather than one in two precisions."""
    diff = [f"{label} {getattr(model.args, key)} vs {getattr(ref.args, key)}" for label, key in SHAPE
            if getattr(model.args, key) != getattr(ref.args, key)]
    if not diff:
        return []
    return [f"MODEL and REF are different models ({', '.join(diff)}): the figures compare two models, "
            "not a quantization with its reference"]


def evaluate(model: Engine, ref: Engine, text: str, ctx: int = 256,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    if model.args.vocab_size != ref.args.vocab_size:
        raise EvalError(f"the models have different vocabularies ({model.args.vocab_size} and {ref.args.vocab_size} tokens)")
    if model.tokenizer.get_vocab(with_added_tokens=True) != ref.tokenizer.get_vocab(with_added_tokens=True):
        raise EvalError("the models have different tokenizers: the same token id means different text in each")
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    ctx = min(ctx, model.ctx, ref.ctx)
    n_chunks = len(ids) // ctx
    if ctx < 8 or n_chunks < 1:
        raise EvalError(f"the text has {len(ids)} tokens; at least one chunk of {ctx} is needed (a longer text or a smaller --ctx)")
    nll, ref_nll, kls, agree = [], [], [], []
    first = ctx // 2
    for c in range(n_chunks):
        chunk = ids[c * ctx:(c + 1) * ctx]
        a = log_softmax(model.model.forward(chunk, model.model.new_cache(), all_logits=True)[first:-1])
        b = log_softmax(ref.model.forward(chunk, ref.model.new_cache(), all_logits=True)[first:-1])
        nxt = np.asarray(chunk[first + 1:])
        rows = np.arange(len(nxt))
        nll.append(-a[rows, nxt])
        ref_nll.append(-b[rows, nxt])
        kls.append(np.maximum((np.exp(b) * (b - a)).sum(-1), 0.0))
        agree.append(a.argmax(-1) == b.argmax(-1))
        if progress:
            progress(c + 1, n_chunks)
    nll, ref_nll, kl, agree = (np.concatenate(v) for v in (nll, ref_nll, kls, agree))
    warnings = unrelated(model, ref)
    if not warnings and agree.mean() < LOW_AGREEMENT:
        warnings.append(f"top-1 agreement is only {100 * agree.mean():.0f}%: is REF really this model's source?")
    return EvalResult(len(nll), float(np.exp(nll.mean())), float(np.exp(ref_nll.mean())), float(kl.mean()),
                      float(np.percentile(kl, 99)), float(agree.mean()), warnings)
