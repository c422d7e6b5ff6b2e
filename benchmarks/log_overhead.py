"""What the op-stream log costs a training step, how fast a replay runs, and how long recovery takes.

One GPT-style training step (AdamW, grad clipping; bf16 autocast on CUDA) runs ``--steps`` times
after ``--warmup`` steps:

- plainly, with no moai-ckpt at all (the floor);
- under ``moai_ckpt.fault_tolerant`` with the default policy (each record durable before the next
  step completes), with ``log_sync=True`` (durable before the next step starts), and with group
  commit of 16 records; no snapshot falls inside the timed window;
- then the default run is started again on its run directory: it restores the step-0 snapshot
  and *replays* every logged step, timed over the same window (replay speed against the live
  step rate), and the time from the call to its first live step is split into restore and replay;
- the default policy once more without the exact full-state digest (everything else the same),
  and the digest alone, around real training steps, as a run takes it (`replay.stateplan`: a
  plan kept between steps, on a side stream on CUDA): its cost on the training thread (checking
  the plan, walking the small objects, hashing CPU tensors, queuing the device reductions), on
  the device (CUDA events around its kernels on the side stream) and on the log thread (reading
  the results, hashing JSON state).

Variants are interleaved over ``--reps`` repetitions, each in a fresh run directory; medians.

    python benchmarks/log_overhead.py --size cpu-small --batch 8 --steps 40 --reps 3
    python benchmarks/log_overhead.py --size gpt2-small --batch 8 --device cuda --steps 50
    python benchmarks/log_overhead.py --size gpt2-small --batch 8 --device cuda --digest-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, SIZES, loss_fn

import moai_ckpt
from moai_ckpt.run.logstream import LogStream
from replay.stateplan import StateDigests
from replay.stepstate import Hyperparameters, StepValues, parameters_of


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain(args: argparse.Namespace) -> float:
    s = Setup(args)
    sampler = moai_ckpt.GlobalSampler(len(s.tokens), s.batch, seed=2)
    start = 0.0
    for step in range(1, args.warmup + args.steps + 1):
        if step == args.warmup + 1:
            sync(s.device)
            start = time.perf_counter()
        s.step(sampler.next_batch())
    sync(s.device)
    return (time.perf_counter() - start) / args.steps


class Clock:
    """Elapsed milliseconds on the host, and on the device with CUDA events (CPU: the host's)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> tuple[float, Any]:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return time.perf_counter(), event

    def since(self, start: tuple[float, Any], end: tuple[float, Any]) -> tuple[float, float]:
        """(host ms, device ms) between two marks (the device's needs both events done)."""
        host = 1e3 * (end[0] - start[0])
        if not self.cuda:
            return host, host
        end[1].synchronize()
        return host, start[1].elapsed_time(end[1])


def digest_cost(args: argparse.Namespace) -> dict[str, float]:
    """The exact full-state digest of each step, timed piece by piece around real training steps."""
    s = Setup(args)
    sampler = moai_ckpt.GlobalSampler(len(s.tokens), s.batch, seed=2)
    tracked = {"model": s.model, "optim": s.opt, "_data": sampler}
    clock = Clock(s.device)
    _, params, _ = parameters_of(tracked)
    sums: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        sums[name] = sums.get(name, 0.0) + value

    digests, stream = StateDigests(), LogStream()  # as the run does: a plan, on a side stream
    stream.guard(tracked)
    for step in range(1, args.warmup + args.steps + 1):
        sync(s.device)
        stream.before_step()
        started = clock.mark()
        loss, grad_norm = s.step(sampler.next_batch())
        host_from = time.perf_counter()
        with stream.side(s.device):
            stepped = clock.mark()
            pending = digests.capture(tracked, between=stream.mark_early)
            stream.mark_late()
            captured = clock.mark()
        values = StepValues.capture(params, loss, grad_norm, Hyperparameters())
        normed = clock.mark()
        waited_from = time.perf_counter()
        pending.packed()  # what the log thread does with them
        waited = time.perf_counter()
        values.read()
        sync(s.device)
        if step <= args.warmup:
            continue
        _, step_device = clock.since(started, stepped)
        _, digest_device = clock.since(stepped, captured)
        digest_host = 1e3 * (captured[0] - host_from)
        norms_host, norms_device = clock.since(captured, normed)
        add("step", step_device)
        add("digest: training thread", digest_host)
        if clock.cuda:
            add("digest: device span (its kernels, or launch gaps)", digest_device)
        add("digest: log thread (wait, hash and pack)", 1e3 * (waited - waited_from))
        add("norms (for comparison): training thread", norms_host)
        if clock.cuda:
            add("norms (for comparison): device kernels", norms_device)
    out = {name: total / args.steps for name, total in sums.items()}
    out["entries"] = float(len(pending.names))
    out["plan rebuilds"] = float(digests.rebuilds)
    state = [*s.model.state_dict().values(), *(t for st in s.opt.state.values() for t in st.values())]
    out["state MB"] = sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor)) / 1e6
    return out


def without_state_digest(args: argparse.Namespace, directory: str) -> dict[str, float]:
    """The default policy with the exact state digest left out (records carry none)."""
    return logged(args, directory, state_digests=False)


def logged(args: argparse.Namespace, directory: str, **policy: Any) -> dict[str, float]:
    """One call of a fault_tolerant training function: live on a fresh directory, a replay after."""
    timings: dict[str, float] = {}
    called = time.perf_counter()

    @moai_ckpt.fault_tolerant(
        storage=directory, snapshot_every=10**9, snapshot_at_end=False, deterministic=args.deterministic, **policy
    )
    def train(run: moai_ckpt.Run) -> None:
        s = Setup(args)
        run.track(model=s.model, optim=s.opt)
        run.sampler(len(s.tokens), s.batch, seed=2)
        start = 0.0
        for step in run.steps(args.warmup + args.steps):
            if step == args.warmup + 1:
                sync(s.device)
                start = time.perf_counter()
            loss, grad_norm = s.step(run.batch())
            run.record(loss=loss, grad_norm=grad_norm)
        sync(s.device)
        timings["per_step"] = (time.perf_counter() - start) / args.steps
        timings.update({f"ms {k}": v for k, v in run.log_stats().items()})
        if run.report is not None and run.report.replayed:
            timings["restore"] = run.report.restore_s
            timings["replay"] = run.report.replay_s
            timings["replayed"] = run.report.replayed
            timings["bitwise"] = float(run.report.bitwise)

    try:
        train()
    except moai_ckpt.ReplayDivergenceError as exc:
        check = exc.check
        timings["diverged_at"] = float(exc.step or -1)
        timings["quantity"] = check.first if check is not None else "?"  # type: ignore[assignment]
        print(f"replay diverged: {exc}", file=sys.stderr)
    timings["call"] = time.perf_counter() - called
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dir", default="bench_out/log")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True) in every variant"
    )
    parser.add_argument("--digest-only", action="store_true", help="measure only the exact full-state digest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True)
    if args.digest_only:
        digests = [digest_cost(args) for _ in range(args.reps)]
        report_digest(args, digests)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "digests": digests}, f, indent=1)
        return
    os.makedirs(args.dir, exist_ok=True)
    variants: dict[str, Callable[[str], dict[str, float]]] = {
        "log, default (durable before the next step ends)": lambda d: logged(args, d),
        "log, log_sync=True (durable before the next step)": lambda d: logged(args, d, log_sync=True),
        "log, group commit of 16": lambda d: logged(args, d, log_flush_every=16, log_flush_seconds=5.0),
        "log, durable within 4 steps (log_lag=4)": lambda d: logged(args, d, log_lag=4),
        "log, default, without the exact state digest": lambda d: without_state_digest(args, d),
    }
    results: dict[str, list[float]] = {"no moai-ckpt": [], **{name: [] for name in variants}}
    replays: list[dict[str, float]] = []
    breakdowns: list[dict[str, float]] = []
    digests: list[dict[str, float]] = []
    for rep in range(args.reps):
        results["no moai-ckpt"].append(plain(args))
        digests.append(digest_cost(args))
        for i, (name, fn) in enumerate(variants.items()):
            directory = os.path.join(args.dir, f"r{rep}-{i}")
            shutil.rmtree(directory, ignore_errors=True)
            timings = fn(directory)
            results[name].append(timings["per_step"])
            if i == 0:
                breakdowns.append({k[3:]: v for k, v in timings.items() if k.startswith("ms ")})
            if i == 0:
                replays.append(logged(args, directory))  # a restart: restore step 0, replay every step
            shutil.rmtree(directory, ignore_errors=True)
    report(args, results, replays, digests)
    print("\nwhere the default policy's time goes (mean ms per step, median of the repetitions)")
    for key in breakdowns[0]:
        print(f"  {key:<50}{statistics.median(b[key] for b in breakdowns):>8.3f}")
    report_digest(args, digests)


def report_digest(args: argparse.Namespace, digests: list[dict[str, float]]) -> None:
    first = digests[0]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} torch thread(s)"
    print(
        f"\n{args.size}, batch {args.batch}, {args.steps} steps after {args.warmup}, {args.reps} repetitions; {where}"
    )
    print(
        f"exact full-state digest: {int(first['entries'])} entries, {first['state MB']:.1f} MB of tensors, "
        f"plan built {int(first['plan rebuilds'])} time(s) "
        f"(mean ms per step, median of the repetitions; {'CUDA events' if args.device == 'cuda' else 'host clock'})"
    )
    step = statistics.median(d["step"] for d in digests)
    for key in first:
        if key in ("entries", "state MB", "plan rebuilds"):
            continue
        value = statistics.median(d[key] for d in digests)
        share = "" if key == "step" else f"{100 * value / step:>8.2f} % of the step"
        print(f"  {key:<50}{value:>8.3f}{share}")


def report(
    args: argparse.Namespace,
    results: dict[str, list[float]],
    replays: list[dict[str, float]],
    digests: list[dict[str, float]],
) -> None:
    params = sum(p.numel() for p in GPT(SIZES[args.size]).parameters())
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} torch thread(s)"
    mode = ", deterministic algorithms" if args.deterministic else ""
    print(
        f"\n{args.size} ({params / 1e6:.1f}M parameters), batch {args.batch} x {SIZES[args.size].ctx} tokens, "
        f"{args.steps} timed steps after {args.warmup}, median of {args.reps}; {where}{mode}; torch {torch.__version__}"
    )
    base = statistics.median(results["no moai-ckpt"])
    print(f"{'method':<52}{'ms/step':>10}{'overhead':>10}   all runs (ms)")
    for name, values in results.items():
        med = statistics.median(values)
        runs = " ".join(f"{v * 1e3:.2f}" for v in values)
        print(f"{name:<52}{med * 1e3:>10.2f}{(med / base - 1) * 100:>9.2f}%   {runs}")
    live = statistics.median(results["log, default (durable before the next step ends)"])
    diverged = [r for r in replays if "diverged_at" in r]
    if diverged:
        for r in diverged:
            print(f"\nreplay after a restart: diverged from the log at step {int(r['diverged_at'])} ({r['quantity']})")
        print("the step is not deterministic on this device: rerun with --deterministic")
        return
    replay_step = statistics.median(r["per_step"] for r in replays)
    restore = statistics.median(r["restore"] for r in replays)
    replay_total = statistics.median(r["replay"] for r in replays)
    replayed = int(replays[0]["replayed"])
    bitwise = all(r["bitwise"] for r in replays)
    print(f"\nreplay after a restart (the default run's directory, {replayed} logged steps)")
    print(f"{'replayed step':<52}{replay_step * 1e3:>10.2f} ms   speed {live / replay_step:.3f}x the live step rate")
    print(f"{'every replayed step bitwise equal to its record':<52}{'yes' if bitwise else 'NO':>10}")
    print(f"{'recovery: restore the snapshot':<52}{restore:>10.3f} s")
    print(f"{'recovery: replay to the last logged step':<52}{replay_total:>10.3f} s")
    print(f"{'recovery: restart to first live step':<52}{restore + replay_total:>10.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "replays": replays, "digests": digests}, f, indent=1)


if __name__ == "__main__":
    main()
