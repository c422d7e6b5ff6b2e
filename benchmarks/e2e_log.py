"""End to end: what the per-step op-stream log costs a training step, and how fast a replay runs.

One GPT-style training step (`gpt.py`: AdamW, fused on CUDA, grad clipping; bf16 autocast on
CUDA) runs in one process, on one model and optimizer, in alternating loops of ``--warmup`` +
``--steps`` steps:

- plainly, with no moai-ckpt at all (the floor);
- inside ``moai_ckpt.fault_tolerant`` (whatever `Run` logs per step; no snapshot falls inside
  the timed window), with the default policy and, with ``--variants``, others (``log_sync``,
  group commit of 16, ``log_lag=4``).

Each repetition runs every variant once, order rotated, each logged loop in a fresh run
directory. Iterations are timed by CUDA events on the training stream (on CPU by the clock), from
the top of one iteration to the top of the next, so the run's work between steps is included.
Reported: the mean step of each loop, the overhead of each logged loop against the plain loop of
the same repetition (median over repetitions and the paired spread), the same on per-loop median
steps, and where the training thread's and the log thread's time goes (`Run.log_stats`).

With ``--replay`` the last default-policy run directory is started again: it restores the step-0
snapshot and replays every logged step (checked bitwise), timed against the live step rate.
Replays on a GPU need ``--deterministic`` (flash attention's backward is not deterministic).

    python benchmarks/e2e_log.py                                  # GPU: GPT-2 small, 7 reps
    OMP_NUM_THREADS=1 python benchmarks/e2e_log.py --device cpu --out docs/results
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from gpt import GPT, SIZES, loss_fn

import moai_ckpt

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "log_sync": {"log_sync": True},
    "group16": {"log_flush_every": 16, "log_flush_seconds": 5.0},
    "lag4": {"log_lag": 4},
}
LABELS = {
    "plain": "plain loop (no moai-ckpt)",
    "default": "logged, default policy",
    "log_sync": "logged, log_sync=True",
    "group16": "logged, group commit of 16",
    "lag4": "logged, log_lag=4",
}


class Setup:
    """Model, optimizer and an indexable token dataset on the benchmark's device."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.cfg = SIZES[args.size]
        self.device = torch.device(args.device)
        self.model = GPT(self.cfg).to(self.device)
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1, fused=fused)
        samples = max(args.batch * (args.warmup + args.steps + 1), 64)
        gen = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, self.cfg.vocab, (samples, self.cfg.ctx + 1), generator=gen).to(self.device)
        self.batch = args.batch
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def step(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast:
            loss = loss_fn(self.model, self.tokens[indices])
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed_loop(setup: Setup, steps: Iterable[int], body: Callable[[int], None], warmup: int) -> list[float]:
    """Run ``body`` for each step; the durations of the iterations after ``warmup`` (top to top)."""
    marks = common.Marks(setup.device)
    setup.sync()
    for step in steps:
        marks.mark()
        body(step)
    marks.mark()
    return marks.durations()[warmup:]


def plain(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    sampler = moai_ckpt.GlobalSampler(len(setup.tokens), setup.batch, seed=2)

    def body(_: int) -> None:
        setup.step(sampler.next_batch())

    times = timed_loop(setup, range(1, args.warmup + args.steps + 1), body, args.warmup)
    return {"times": times}


def logged(setup: Setup, args: argparse.Namespace, directory: str, **policy: Any) -> dict[str, Any]:
    """One call of a fault_tolerant training function on ``directory`` (live, or a replay if it has a log)."""
    result: dict[str, Any] = {}

    @moai_ckpt.fault_tolerant(
        storage=directory, snapshot_every=10**9, snapshot_at_end=False, deterministic=args.deterministic, **policy
    )
    def train(run: moai_ckpt.Run) -> None:
        run.track(model=setup.model, optim=setup.opt)
        run.sampler(len(setup.tokens), setup.batch, seed=2)

        def body(_: int) -> None:
            loss, grad_norm = setup.step(run.batch())
            run.record(loss=loss, grad_norm=grad_norm)

        result["times"] = timed_loop(setup, run.steps(args.warmup + args.steps), body, args.warmup)
        stats = getattr(run, "log_stats", None)
        result["stats"] = stats() if stats is not None else {}
        if run.report is not None and run.report.replayed:
            result["restore"] = run.report.restore_s
            result["replay"] = run.report.replay_s
            result["replayed"] = run.report.replayed
            result["bitwise"] = bool(run.report.bitwise)

    try:
        train()
    except moai_ckpt.ReplayDivergenceError as exc:
        result["diverged_at"] = exc.step
        result["quantity"] = exc.check.first if exc.check is not None else "?"
    return result


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: gpt2-small on CUDA, cpu-tiny on CPU")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, help="timed steps per loop (default: 100 on CUDA, 60 on CPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--variants", default="default", help=f"logged variants, of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dir", default="bench_out/e2e_log")
    parser.add_argument("--out", help="write e2e_log_<device>.json and .txt into this directory")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--replay", action="store_true", help="also time a restart that replays the logged steps")
    parser.add_argument(
        "--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True) in every variant"
    )
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("gpt2-small" if cuda else "cpu-tiny")
    args.steps = args.steps or (100 if cuda else 60)
    torch.set_num_threads(args.threads)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True)
    variants = [v for v in args.variants.split(",") if v]
    out = common.Output()
    setup = Setup(args)
    params = sum(p.numel() for p in setup.model.parameters())
    where = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} torch thread(s)"
    out(f"# e2e_log, {time.strftime('%Y-%m-%d %H:%M')}: {where}; {common.machine()}")
    out(
        f"{args.size} ({params / 1e6:.1f}M parameters), batch {args.batch} x {setup.cfg.ctx} tokens, "
        f"{args.steps} timed steps after {args.warmup} per loop, {args.reps} repetitions"
        f"{', deterministic algorithms' if args.deterministic else ''}; {common.load_average()}"
    )
    base = os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    plain(setup, args)  # warm up kernels and the allocator
    names = ["plain", *variants]
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    last_dir = ""
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            if name == "plain":
                results[name].append(plain(setup, args))
                continue
            directory = os.path.join(base, f"r{rep}-{name}")
            shutil.rmtree(directory, ignore_errors=True)
            results[name].append(logged(setup, args, directory, **VARIANTS[name]))
            if name == "default" and args.replay:
                shutil.rmtree(last_dir, ignore_errors=True)
                last_dir = directory
            else:
                shutil.rmtree(directory, ignore_errors=True)
        line = ", ".join(f"{n} {mean(results[n][-1]['times']) * 1e3:.2f}" for n in order)
        out(f"rep {rep + 1}: mean ms/step: {line}; {common.load_average()}")

    out("")
    rows = []
    summary: dict[str, dict[str, float]] = {}
    plain_means = [mean(r["times"]) for r in results["plain"]]
    plain_medians = [statistics.median(r["times"]) for r in results["plain"]]
    for name in names:
        means = [mean(r["times"]) for r in results[name]]
        medians = [statistics.median(r["times"]) for r in results[name]]
        paired = [100 * (m / p - 1) for m, p in zip(means, plain_means, strict=True)]
        paired_med = [100 * (m / p - 1) for m, p in zip(medians, plain_medians, strict=True)]
        summary[name] = {
            "mean_ms": 1e3 * statistics.median(means),
            "overhead_pct": statistics.median(paired),
            "paired_min_pct": min(paired),
            "paired_max_pct": max(paired),
            "overhead_on_medians_pct": statistics.median(paired_med),
        }
        rows.append(
            [
                LABELS[name],
                f"{1e3 * statistics.median(means):.2f}",
                "" if name == "plain" else f"{statistics.median(paired):+.2f} %",
                "" if name == "plain" else f"{min(paired):+.2f} .. {max(paired):+.2f} %",
                "" if name == "plain" else f"{statistics.median(paired_med):+.2f} %",
                " ".join(f"{1e3 * m:.2f}" for m in means),
            ]
        )
    header = [
        "variant",
        "ms/step (median of loop means)",
        "overhead (median of pairs)",
        "paired spread",
        "overhead on loop medians",
        "loop means (ms)",
    ]
    for line in common.markdown_table(header, rows):
        out(line)
    breakdown: dict[str, float] = {}
    if "default" in results and results["default"][0].get("stats"):
        out("")
        out("where the default policy's time goes (mean ms per step, median of the repetitions):")
        for key in results["default"][0]["stats"]:
            breakdown[key] = statistics.median(r["stats"].get(key, float("nan")) for r in results["default"])
            out(f"  {key:<50}{breakdown[key]:>8.3f}")
    replay: dict[str, Any] = {}
    if args.replay and last_dir:
        replay = logged(setup, args, last_dir)
        shutil.rmtree(last_dir, ignore_errors=True)
        out("")
        if "diverged_at" in replay:
            out(f"replay after a restart: diverged at step {replay['diverged_at']} ({replay['quantity']})")
            out("the step is not deterministic on this device: rerun with --deterministic")
        else:
            live = summary["default"]["mean_ms"] / 1e3
            step = mean(replay["times"])
            out(f"replay after a restart ({replay.get('replayed', 0)} logged steps):")
            out(f"  replayed step {step * 1e3:.2f} ms, {live / step:.3f}x the live step rate")
            out(f"  every replayed step bitwise equal to its record: {'yes' if replay.get('bitwise') else 'NO'}")
            out(
                f"  recovery: restore {replay.get('restore', float('nan')):.3f} s + replay {replay.get('replay', float('nan')):.3f} s"
            )
    out(common.load_average())
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": where,
        "machine": common.machine(),
        "torch": torch.__version__,
        "args": vars(args),
        "params": params,
        "summary": summary,
        "breakdown": breakdown,
        "replay": {k: v for k, v in replay.items() if k != "times"}
        | ({"times": replay["times"]} if "times" in replay else {}),
        "loops": results,
    }
    name = f"e2e_log_{'gpu' if cuda else 'cpu'}"
    out.write_results(name, result, args.out, args.json)


if __name__ == "__main__":
    main()
