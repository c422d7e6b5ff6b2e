"""The demo's small GPT: a `moai_ckpt.fault_tolerant` training function, on one process or under torchrun.

    torchrun --standalone --nproc-per-node 2 -m moai_ckpt.tools.gpt --storage runs/gpt --steps 60 --result out.json
    python -m moai_ckpt.tools.gpt --storage runs/gpt --steps 60          # one process

A character-level decoder-only transformer (token embedding + learned positions, pre-LayerNorm
causal self-attention blocks with an MLP, output head tied to the embedding, dropout) learns a
corpus generated here from a seeded grammar, so nothing is downloaded. Sample ``i`` is the fixed
window ``tokens[i * stride : i * stride + context + 1]``; `moai_ckpt.Run.sampler` decides which
samples make up each global batch, and each rank trains on its share under DistributedDataParallel
(gloo).

Kill a rank at any point and let torchrun restart the workers (``--max-restarts``): the run
restores its newest snapshot, replays the logged steps and continues, ending with parameters
bitwise equal to an uninterrupted run. ``moai-ckpt demo`` does exactly that and compares the two;
the chaos harness's built-in scenarios train it too. It ships in the package, so both work from
an installed wheel in any directory.

`train` takes only JSON-able keyword arguments, the run directory (``storage``) among them, so
``moai-ckpt restore --trust-run-json`` can call it again by name from what ``run.json`` records
(``moai_ckpt.tools.gpt:train``; or ``--entrypoint moai_ckpt.tools.gpt:train`` with ``--kwarg``s).
The snapshot interval comes from ``GPT_DEMO_SNAPSHOT_EVERY`` (read when this module is imported).
Each step's log record is durable before the next step starts (``log_sync=True``): a kill loses no
completed step, which is what the demo shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import moai_ckpt

SNAPSHOT_EVERY_ENV = "GPT_DEMO_SNAPSHOT_EVERY"
VOCAB = "\n !,.?abcdefghijklmnopqrstuvwxyz"
STOI = {c: i for i, c in enumerate(VOCAB)}

# -- the corpus: English-like sentences from a seeded grammar ------------------------------------

_WORDS = {
    "det": "the a every one that my your no",
    "adj": "small old quiet bright tired green clever heavy strange happy cold",
    "noun": "cat dog farmer river teacher bird child engine garden king sailor window letter horse storm baker lamp",
    "verb": "sees finds carries follows paints remembers opens watches builds hears forgets answers keeps pushes",
    "intrans": "sleeps sings waits laughs runs falls shines listens wanders",
    "adv": "slowly|again|today|at night|in the morning|without a word|very well|alone",
    "prep": "near under behind across beside inside above",
    "conj": "and but so while because",
    "wh": "why where when how",
}
_CHOICES = {kind: words.split("|" if "|" in words else " ") for kind, words in _WORDS.items()}


def _pick(rng: random.Random, kind: str) -> str:
    return rng.choice(_CHOICES[kind])


def _noun_phrase(rng: random.Random) -> str:
    words = [_pick(rng, "det")]
    if rng.random() < 0.5:
        words.append(_pick(rng, "adj"))
    words.append(_pick(rng, "noun"))
    if rng.random() < 0.2:
        words += [_pick(rng, "prep"), _pick(rng, "det"), _pick(rng, "noun")]
    return " ".join(words)


def _clause(rng: random.Random) -> str:
    if rng.random() < 0.35:
        clause = f"{_noun_phrase(rng)} {_pick(rng, 'intrans')}"
    else:
        clause = f"{_noun_phrase(rng)} {_pick(rng, 'verb')} {_noun_phrase(rng)}"
    return f"{clause} {_pick(rng, 'adv')}" if rng.random() < 0.4 else clause


def _sentence(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.5:
        return _clause(rng) + "."
    if roll < 0.8:
        return f"{_clause(rng)}, {_pick(rng, 'conj')} {_clause(rng)}."
    if roll < 0.9:
        return (
            f"{_pick(rng, 'wh')} does {_noun_phrase(rng)} {_pick(rng, 'verb').removesuffix('s')} {_noun_phrase(rng)}?"
        )
    return f"{_noun_phrase(rng)} says {_clause(rng)}!"


def make_corpus(chars: int = 120_000, seed: int = 0) -> str:
    """English-like text of about ``chars`` characters, a function of ``seed`` alone.

    Args:
        chars: the length of the text (it ends at the first sentence boundary past it, then is cut).
        seed: the grammar's random seed.

    Returns:
        Lines of two to five sentences, in the alphabet `VOCAB`.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    size = 0
    while size < chars:
        line = " ".join(_sentence(rng) for _ in range(rng.randint(2, 5)))
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)[:chars]


def encode(text: str) -> torch.Tensor:
    """The token ids (int64) of ``text``, one per character of `VOCAB`."""
    return torch.tensor([STOI[c] for c in text], dtype=torch.long)


# -- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a `GPT`."""

    vocab: int = len(VOCAB)
    context: int = 64
    dim: int = 64
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the positions before it."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)
        causal = torch.tril(torch.ones(cfg.context, cfg.context, dtype=torch.bool))
        self.causal: torch.Tensor
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        weights = scores.masked_fill(~self.causal[:t, :t], float("-inf")).softmax(dim=-1)
        y = (self.attn_drop(weights) @ v).transpose(1, 2).reshape(b, t, c)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: attention, then a 4x MLP, each on a residual branch."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim), nn.Dropout(cfg.dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A decoder-only language model whose output head shares the token embedding's weight."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)
        nn.init.normal_(self.pos, std=0.02)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(tokens) + self.pos[: tokens.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on biases, norms or positions)."""
    params = {id(p): p for p in model.parameters()}.values()
    decay = [p for p in params if p.dim() == 2 and p is not getattr(model, "pos", None)]
    rest = [p for p in params if all(p is not d for d in decay)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of the peak at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def num_samples(tokens: torch.Tensor, context: int, stride: int) -> int:
    """How many windows of ``context + 1`` tokens, ``stride`` apart, fit in ``tokens``."""
    return (len(tokens) - context - 1) // stride + 1


def windows(tokens: torch.Tensor, indices: list[int], context: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of samples ``indices``: sample i is ``tokens[i*stride : i*stride+context+1]``."""
    rows = torch.stack([tokens[i * stride : i * stride + context + 1] for i in indices])
    return rows[:, :-1], rows[:, 1:]


def param_digest(model: nn.Module) -> str:
    """SHA-256 over the model's state_dict (key names and raw bytes), keys in sorted order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- training -------------------------------------------------------------------------------------


class _Progress:
    """One JSON line per event on rank 0 (``progress`` path), for whoever watches the run."""

    def __init__(self, path: str | None, rank: int) -> None:
        self.path = path if rank == 0 else None
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def emit(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({"event": event, "attempt": self.attempt, "t": time.time(), **fields})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


@moai_ckpt.fault_tolerant(
    storage="{storage}",
    snapshot_every=int(os.environ.get(SNAPSHOT_EVERY_ENV, "20")),
    log_sync=True,
    capture_ops=os.environ.get("GPT_DEMO_CAPTURE_OPS", "on_divergence"),  # benchmarks/gpu_ops.sh: after_snapshot
)
def train(
    run: moai_ckpt.Run,
    *,
    storage: str = "runs/gpt_demo",
    steps: int = 60,
    seed: int = 0,
    corpus_chars: int = 120_000,
    context: int = 64,
    stride: int = 32,
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    dropout: float = 0.1,
    batch_size: int = 16,
    lr: float = 3e-3,
    warmup: int = 10,
    progress: str | None = None,
) -> dict[str, Any]:
    """Train the GPT for ``steps`` global steps of ``batch_size`` samples (split over the ranks).

    Args:
        run: the fault-tolerant run (passed by `moai_ckpt.fault_tolerant`).
        storage: the run directory (any fsspec URL).
        steps: global optimizer steps.
        seed: seeds the corpus, the initial weights, the sample order and each rank's dropout.
        corpus_chars: length of the generated corpus.
        context: tokens a sample predicts from.
        stride: characters between the starts of consecutive samples.
        dim: model width.
        layers: transformer blocks.
        heads: attention heads per block.
        dropout: dropout probability (embeddings, attention weights, residual branches).
        batch_size: global batch size, unchanged by the number of ranks.
        lr: peak learning rate.
        warmup: linear warm-up steps.
        progress: a file rank 0 appends one JSON line to per event: ``start`` (the run is set up),
            ``resume`` (the snapshot of ``step`` is restored), ``live`` (the first step run live),
            ``step`` (a completed step and its loss, reported when the next one starts) and ``done``.

    Returns:
        ``digest`` (`param_digest` of the final model), ``losses`` (step -> mean loss over ranks,
        the steps this process ran live), ``replayed_losses`` (the same for the steps replayed from
        the log), ``replayed``, ``first_step`` (the first step after the restored snapshot) and
        ``first_live_step``.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = run.device
    events = _Progress(progress, rank)
    events.emit("start", world_size=world)

    tokens = encode(make_corpus(corpus_chars, seed))
    cfg = GPTConfig(context=context, dim=dim, layers=layers, heads=heads, dropout=dropout)
    torch.manual_seed(seed)  # the same initial weights on every rank
    random.seed(seed)  # every generator the run's state holds starts from the seed, so two runs of
    np.random.seed(seed)  # the same job are the same run, generator states included
    model = GPT(cfg).to(device)
    ddp: nn.Module = DistributedDataParallel(model) if world > 1 else model
    opt = optimizer(model, lr)
    sched = warmup_cosine(opt, steps, warmup)
    run.track(model=model, optim=opt, sched=sched)
    run.sampler(num_samples(tokens, context, stride), batch_size, seed=seed)
    torch.manual_seed(seed * 1_000 + 1 + rank)  # each rank its own dropout masks

    live: dict[int, float] = {}
    replayed: dict[int, float] = {}
    first_step: int | None = None
    done: tuple[int, float, bool] | None = None  # reported once run.steps() has completed it
    for step in run.steps(steps):
        if first_step is None:
            first_step = step
            events.emit("resume", step=step - 1)
        if done is not None:
            events.emit("step", step=done[0], loss=done[1], replayed=done[2])
        if not run.replaying and not live:
            events.emit("live", step=step)  # the first step this process runs live
        inputs, targets = (t.to(device) for t in windows(tokens, run.batch(), context, stride))
        opt.zero_grad(set_to_none=True)
        logits = ddp(inputs)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), targets.reshape(-1))
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run.record(loss=loss, grad_norm=grad_norm)
        mean = _mean_over_ranks(loss, world)
        (replayed if run.replaying else live)[step] = mean
        done = (step, mean, run.replaying)
    if done is not None:
        events.emit("step", step=done[0], loss=done[1], replayed=done[2])
    digest = param_digest(model)
    events.emit("done", digest=digest, replayed=run.replayed)
    return {
        "digest": digest,
        "losses": live,
        "replayed_losses": replayed,
        "replayed": run.replayed,
        "first_step": first_step,
        "first_live_step": min(live) if live else None,
    }


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    """The mean of a scalar over the ranks, summed in rank order (the same on every run)."""
    if world == 1:
        return float(value.detach())
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, value.detach().to("cpu", torch.float64).reshape(1))
    return sum(float(v) for v in gathered) / world


# -- the command line (one process, or each torchrun worker) ---------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Train with options from the command line; rank 0 writes the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default="runs/gpt_demo", help="run directory, any fsspec URL")
    parser.add_argument("--result", help="write the result JSON here (rank 0)")
    parser.add_argument("--kwargs", default="{}", help="more keyword arguments of train(), as a JSON object")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", help="append one JSON line per event here (rank 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    kwargs = {
        "storage": args.storage,
        "steps": args.steps,
        "seed": args.seed,
        "progress": args.progress,
        **json.loads(args.kwargs),
    }
    try:
        out = train(**kwargs)
        if args.result and (not dist.is_initialized() or dist.get_rank() == 0):
            result = {
                **out,
                "kwargs": kwargs,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            }
            with open(args.result, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
            print(f"result: {args.result} (digest {out['digest'][:16]}, replayed {out['replayed']})", file=sys.stderr)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # run the importable module's `train`, so that run.json names it as moai_ckpt.tools.gpt:train
    from moai_ckpt.tools.gpt import main as _main

    _main()
