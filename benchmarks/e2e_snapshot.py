"""End to end: what a snapshot costs a training loop, against the same loop without snapshots.

A blocking call's duration hides what background work does to the steps after it. This script
measures what a user pays: the wall time of a training loop that snapshots after given steps,
minus the same loop without snapshots, per snapshot. The loop runs ``--steps`` steps and then goes
on stepping while a snapshot is still being written (at most ``--max-extra-steps`` more), so a
persist that outlives the nominal loop is charged to the steps it slows, not cut off.

Methods, side by side in one process, each loop right after a plain loop (its pair), the order
rotated between ``--reps`` repetitions:

- ``floor``: the state copied into preallocated host buffers (pinned on CUDA), then written to one
  file and fsync'ed by a plain Python thread (``os.write`` releases the GIL): the least a
  snapshot needs, blocking the copy, persisting at the disk's speed;
- ``moai-async``: moai-ckpt ``Checkpointer.save_async`` (one Checkpointer for the whole run),
  persisting in a thread of the training process (``persist="thread"``);
- ``moai-process``: the same with ``persist="process"``: the persist runs in moai-ckpt's writer
  process, fed through shared memory (the process is started and awaited before the first loop;
  its start time is printed apart);
- ``moai-sync``: moai-ckpt ``Checkpointer.save``;
- ``dcp-thread``: DCP ``async_save`` in its default thread mode;
- ``dcp-staging``: DCP ``async_save`` with ``DefaultStager(StagingOptions(use_async_staging=True))``
  (torch >= 2.9): the copy overlaps the next forward and backward; the loop waits for it only
  before the optimizer step, as DCP prescribes;
- ``dcp-process``: DCP ``async_save`` with ``AsyncCheckpointerType.PROCESS``, staged into shared
  memory (``DefaultStager``, synchronous staging) and written by DCP's checkpoint process.

Every method makes its data durable: fsync of the file (floor), ``syncfs``/fsync barriers
(moai-ckpt), ``FileSystemWriter(sync_files=True)`` (DCP). On CUDA, iteration times come from CUDA
events on the training stream; the device is synchronized before each snapshot call, so the
blocking time is the call's own. Reported per method: the extra loop time per snapshot (the
headline), the blocking time of each call (the process's first call apart; the wait for the
previous snapshot's persist apart), the persist time (call to durable or committed), and how slow
the steps were while a persist ran.

    python benchmarks/e2e_snapshot.py                        # GPU: the 3.6 GB setup, 22 steps, 3 reps
    OMP_NUM_THREADS=1 python benchmarks/e2e_snapshot.py --device cpu --reps 5 --out docs/results
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from encoder import EncoderConfig, Trainer, default_config

import moai_ckpt


class Persist:
    """One snapshot's background work: when its call began and when it was durable."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.finished: float | None = None
        self.error: BaseException | None = None
        self._event = threading.Event()

    def finish(self, error: BaseException | None = None) -> None:
        self.finished = time.perf_counter()
        self.error = error
        self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        self._event.wait()
        if self.error is not None:
            raise self.error

    @property
    def seconds(self) -> float:
        return float("nan") if self.finished is None else self.finished - self.started


def watch(persist: Persist, wait: Callable[[], object]) -> None:
    """Finish ``persist`` when ``wait()`` returns, from a thread that blocks without the GIL."""

    def run() -> None:
        try:
            wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by Persist.wait
            persist.finish(exc)
            return
        persist.finish()

    threading.Thread(target=run, daemon=True, name="bench-watch").start()


@dataclass
class Call:
    """One snapshot call as the training thread saw it."""

    step: int
    first: bool  # the process's first call of this method
    waited_previous: float  # waiting for the previous snapshot's persist, before the call
    blocked: float  # the call (and, for overlapped staging, the wait before the optimizer step)
    parts: dict[str, float] = field(default_factory=dict)  # where a moai-ckpt call's time went


class Method:
    """A way to snapshot; `snapshot` is called after the optimizer step of a snapshot step."""

    key = ""
    label = ""

    def __init__(self, trainer: Trainer, base: str) -> None:
        self.trainer = trainer
        self.dir = os.path.join(base, self.key)
        self.calls: list[Call] = []
        self.persists: list[Persist] = []
        self.loop_persists: list[Persist] = []
        self.rep = 0

    @staticmethod
    def unavailable(trainer: Trainer) -> str | None:
        """Why this method cannot run here (None: it can)."""
        return None

    def begin_loop(self, rep: int) -> None:
        self.rep = rep
        self.loop_persists = []
        os.makedirs(self.dir, exist_ok=True)

    def snapshot(self, step: int) -> None:
        started = time.perf_counter()
        if self.loop_persists:
            self.loop_persists[-1].wait()
        called = time.perf_counter()
        self.parts: dict[str, float] = {}
        persist = self._snapshot(step, called)
        self.calls.append(Call(step, not self.calls, called - started, time.perf_counter() - called, self.parts))
        self.persists.append(persist)
        self.loop_persists.append(persist)

    def _snapshot(self, step: int, called: float) -> Persist:
        raise NotImplementedError

    def before_optimizer(self) -> None:
        """Called between backward and the optimizer step of every step."""

    def busy(self) -> bool:
        return any(not p.done() for p in self.loop_persists)

    def finish(self) -> None:
        for p in self.loop_persists:
            p.wait()

    def end_loop(self) -> None:
        """After the timed loop: delete what it wrote."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def close(self) -> None:
        """After the last loop."""

    def path(self, step: int) -> str:
        return os.path.join(self.dir, f"r{self.rep}-s{step}")


class Floor(Method):
    key = "floor"
    label = "floor: copy + raw write+fsync"

    def __init__(self, trainer: Trainer, base: str) -> None:
        super().__init__(trainer, base)
        self.sources = trainer.tensors()
        pin = trainer.device.type == "cuda"
        self.buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in self.sources]

    def _snapshot(self, step: int, called: float) -> Persist:
        for buf, src in zip(self.buffers, self.sources, strict=True):
            buf.copy_(src, non_blocking=buf.is_pinned())
        self.trainer.sync()
        persist = Persist(called)
        path = self.path(step)
        watch(persist, lambda: common.raw_write(path, self.buffers))
        return persist


class MoaiAsync(Method):
    key = "moai-async"
    label = "moai-ckpt save_async"
    persist = "thread"

    def __init__(self, trainer: Trainer, base: str) -> None:
        super().__init__(trainer, base)
        # the RNG states are left out so that every method saves the same bytes
        self.ckpt = moai_ckpt.Checkpointer(self.dir, capture_rng=False, persist=self.persist)
        self.paths: list[str] = []  # where each save_async persisted (SaveHandle.persist)

    def _snapshot(self, step: int, called: float) -> Persist:
        handle = self.ckpt.save_async(1000 * self.rep + step, self.trainer.state())
        persist = Persist(called)
        assert handle is not None
        self.paths.append(handle.persist)
        watch(persist, handle.result)
        copies = getattr(getattr(self.ckpt, "_stager", None), "pending", None)
        self.parts = {"stage": handle.stall_s, "queue copies": getattr(copies, "queue_s", float("nan"))}
        return persist

    def end_loop(self) -> None:
        self.ckpt.prune(keep=1)

    def close(self) -> None:
        self.ckpt.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class MoaiProcess(MoaiAsync):
    key = "moai-process"
    label = "moai-ckpt save_async, writer process"
    persist = "process"

    def __init__(self, trainer: Trainer, base: str) -> None:
        super().__init__(trainer, base)
        started = time.perf_counter()
        if not self.ckpt.start_writer(wait=300):
            raise RuntimeError("moai-ckpt's writer process did not start")
        self.start_s = time.perf_counter() - started


class MoaiSync(MoaiAsync):
    key = "moai-sync"
    label = "moai-ckpt save (sync)"

    def _snapshot(self, step: int, called: float) -> Persist:
        self.ckpt.save(1000 * self.rep + step, self.trainer.state())
        persist = Persist(called)
        persist.finish()
        return persist


def _writer(path: str) -> Any:
    return dcp.FileSystemWriter(path, sync_files=True)


class DcpThread(Method):
    key = "dcp-thread"
    label = "DCP async_save (thread)"

    def _snapshot(self, step: int, called: float) -> Persist:
        path = self.path(step)
        future = cast(
            Future, dcp.async_save(self.trainer.state_dict(), checkpoint_id=path, storage_writer=_writer(path))
        )
        persist = Persist(called)
        future.add_done_callback(lambda f: persist.finish(f.exception()))
        return persist


def _staging_options(trainer: Trainer, *, async_staging: bool, shared: bool) -> Any:
    from torch.distributed.checkpoint.staging import StagingOptions

    cuda = trainer.device.type == "cuda"
    return StagingOptions(
        use_pinned_memory=cuda, use_shared_memory=shared, use_async_staging=async_staging, use_non_blocking_copy=cuda
    )


class DcpStaging(Method):
    key = "dcp-staging"
    label = "DCP async_save, async staging"

    def __init__(self, trainer: Trainer, base: str) -> None:
        super().__init__(trainer, base)
        from torch.distributed.checkpoint.staging import DefaultStager

        self.stager = DefaultStager(_staging_options(trainer, async_staging=True, shared=True))
        self.staging: Any = None

    @staticmethod
    def unavailable(trainer: Trainer) -> str | None:
        try:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no DefaultStager/StagingOptions (torch >= 2.9)"
        if "use_async_staging" not in StagingOptions.__dataclass_fields__:
            return f"torch {torch.__version__}: StagingOptions has no use_async_staging"
        return None

    def _snapshot(self, step: int, called: float) -> Persist:
        path = self.path(step)
        response: Any = dcp.async_save(
            self.trainer.state_dict(), checkpoint_id=path, storage_writer=_writer(path), async_stager=self.stager
        )
        self.staging = response.staging_completion
        persist = Persist(called)
        response.upload_completion.add_done_callback(lambda f: persist.finish(f.exception()))
        return persist

    def before_optimizer(self) -> None:
        # the staged copy must be complete before the optimizer writes the parameters
        if self.staging is None:
            return
        started = time.perf_counter()
        self.staging.result()
        self.staging = None
        self.calls[-1].blocked += time.perf_counter() - started

    def close(self) -> None:
        self.stager.close()


class DcpProcess(Method):
    key = "dcp-process"
    label = "DCP async_save (process)"

    def __init__(self, trainer: Trainer, base: str) -> None:
        super().__init__(trainer, base)
        from torch.distributed.checkpoint.staging import DefaultStager

        self.stager = DefaultStager(_staging_options(trainer, async_staging=False, shared=True))

    @staticmethod
    def unavailable(trainer: Trainer) -> str | None:
        try:
            from torch.distributed.checkpoint.staging import DefaultStager  # noqa: F401
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

            AsyncCheckpointerType.PROCESS  # noqa: B018
        except (ImportError, AttributeError):
            return f"torch {torch.__version__} has no process-based async_save"
        free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
        if free < 2 * trainer.nbytes:
            return f"/dev/shm has {free / 1e9:.2f} GB free, the staged state needs {trainer.nbytes / 1e9:.2f} GB"
        return None

    def _snapshot(self, step: int, called: float) -> Persist:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        path = self.path(step)
        future: Any = dcp.async_save(
            self.trainer.state_dict(),
            checkpoint_id=path,
            storage_writer=_writer(path),
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
            async_stager=self.stager,
        )
        persist = Persist(called)
        future.add_done_callback(lambda f: persist.finish(f.exception()))
        return persist

    def close(self) -> None:
        self.stager.close()


METHODS: dict[str, type[Method]] = {
    m.key: m for m in (Floor, MoaiAsync, MoaiProcess, MoaiSync, DcpThread, DcpStaging, DcpProcess)
}


@dataclass
class Loop:
    """One timed loop: iteration times, which iterations began while a persist ran, the total."""

    method: str
    rep: int
    iterations: list[float] = field(default_factory=list)
    busy: list[bool] = field(default_factory=list)
    snapshot_at: list[int] = field(default_factory=list)
    capped: bool = False

    @property
    def total(self) -> float:
        return sum(self.iterations)

    @property
    def steps(self) -> int:
        return len(self.iterations)


def run_loop(trainer: Trainer, method: Method | None, args: argparse.Namespace, rep: int) -> Loop:
    """``args.steps`` steps, snapshots after ``args.at``; then steps while a persist is in flight."""
    at = set(args.at)
    loop = Loop(method.key if method else "none", rep, snapshot_at=sorted(at) if method else [])
    marks = common.Marks(trainer.device)
    if method is not None:
        method.begin_loop(rep)
    trainer.sync()
    marks.mark()
    step = 0
    while True:
        step += 1
        loop.busy.append(method is not None and method.busy())
        trainer.forward_backward()
        if method is not None:
            method.before_optimizer()
        trainer.optimizer_step()
        if method is not None and step in at:
            trainer.sync()  # the blocking time is the call's own, not the step's queued kernels
            method.snapshot(step)
        marks.mark()
        if step < args.steps:
            continue
        if method is None or not method.busy():
            break
        if step >= args.steps + args.max_extra_steps:
            method.finish()  # charged to the last iteration
            marks.replace_last()
            loop.capped = True
            break
    loop.iterations = marks.durations()
    if method is not None:
        method.finish()
    return loop


@dataclass
class Summary:
    """What the table shows for one method."""

    key: str
    label: str
    extra: list[float]  # per repetition: extra loop seconds per snapshot
    first_blocked: float
    steady_blocked: float
    waited: float  # median wait for the previous persist, over the calls
    waited_max: float
    first_persist: float
    steady_persist: float
    slowdown: float  # median iteration while a persist ran / median plain iteration
    extra_steps: int  # median steps run after the nominal loop, waiting for a persist

    @property
    def extra_median(self) -> float:
        return common.median(self.extra)


def summarize(method: Method, loops: list[Loop], pairs: list[Loop], snapshots: int) -> Summary:
    extra = []
    slow, plain = [], []
    for loop, base in zip(loops, pairs, strict=True):
        per_step = base.total / base.steps
        extra.append((loop.total - loop.steps * per_step) / snapshots)
        slow += [
            t
            for i, (t, b) in enumerate(zip(loop.iterations, loop.busy, strict=True))
            if b and i + 1 not in loop.snapshot_at
        ]
        plain += base.iterations
    calls, persists = method.calls, method.persists
    first, rest = calls[0], calls[1:] or calls
    return Summary(
        key=method.key,
        label=method.label,
        extra=extra,
        first_blocked=first.blocked,
        steady_blocked=common.median([c.blocked for c in rest]),
        waited=common.median([c.waited_previous for c in calls]),
        waited_max=max(c.waited_previous for c in calls),
        first_persist=persists[0].seconds,
        steady_persist=common.median([p.seconds for p in persists[1:] or persists]),
        slowdown=common.median(slow) / common.median(plain) if slow else float("nan"),
        extra_steps=int(
            common.median([float(loop.steps - base.steps) for loop, base in zip(loops, pairs, strict=True)])
        ),
    )


def report(out: common.Output, summaries: list[Summary], step_s: float) -> None:
    floor = next((s for s in summaries if s.key == "floor"), None)
    header = [
        "method",
        "extra loop s / snapshot",
        "in steps",
        "x floor",
        "blocking: first call s",
        "blocking: steady s",
        "waited for previous persist s (median / max)",
        "persist s: first / steady",
        "step while persisting (x plain)",
        "extra steps run",
        "extra per rep (s)",
    ]
    rows = []
    for s in summaries:
        rows.append(
            [
                s.label,
                f"{s.extra_median:.3f}",
                f"{s.extra_median / step_s:.1f}",
                f"{s.extra_median / floor.extra_median:.2f}" if floor and floor.extra_median > 0 else "",
                f"{s.first_blocked:.3f}",
                f"{s.steady_blocked:.3f}",
                f"{s.waited:.3f} / {s.waited_max:.3f}",
                f"{s.first_persist:.2f} / {s.steady_persist:.2f}",
                f"{s.slowdown:.2f}",
                str(s.extra_steps),
                " ".join(f"{x:.3f}" for x in s.extra),
            ]
        )
    for line in common.markdown_table(header, rows):
        out(line)
    waited = [s for s in summaries if s.waited_max > 0.01]
    if waited:
        out("")
        out(
            "note: at a snapshot call the previous snapshot was still being written by "
            + ", ".join(s.label for s in waited)
            + " (the waited column): snapshots came faster than those methods persist, and the wait is part "
            "of their extra loop time; space them wider (--at) to see one snapshot's cost alone."
        )
    ours = [s for s in summaries if s.key.startswith("moai")]
    thread = next((s for s in summaries if s.key == "moai-async"), None)
    process = next((s for s in summaries if s.key == "moai-process"), None)
    if thread and process:
        out("")
        out(
            f"writer process against thread: extra loop time per snapshot {process.extra_median:.3f} s against "
            f"{thread.extra_median:.3f} s (thread / process: {thread.extra_median / process.extra_median:.2f}), step while "
            f"persisting {process.slowdown:.2f}x against {thread.slowdown:.2f}x plain; per repetition, "
            "thread - process: " + " ".join(f"{t - p:+.3f}" for t, p in zip(thread.extra, process.extra, strict=False))
        )
    peers = [s for s in summaries if s.key.startswith("dcp")]
    if ours and peers:
        out("")
        out("extra loop time per snapshot, peer / moai-ckpt (higher: moai-ckpt costs less):")
        for o in ours:
            ratios = ", ".join(f"{p.label}: {p.extra_median / o.extra_median:.2f}x" for p in peers)
            out(f"  {o.label}: {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--steps", type=int, default=22, help="steps in a loop (then more while a persist runs)")
    parser.add_argument("--at", default="3,13", help="snapshot after these steps")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-extra-steps", type=int, default=400)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--dir", default="bench_out/e2e_snapshot", help="where the snapshots go (a local disk)")
    parser.add_argument("--out", help="write e2e_snapshot_<device>.json and .txt into this directory")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--budget-s", type=float, default=0.0, help="start no repetition after this many seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    args.at = sorted(int(s) for s in args.at.split(",") if s)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    device = torch.device(args.device)
    base_cfg = default_config(device)
    cfg = EncoderConfig(
        layers=args.layers or base_cfg.layers,
        d_model=args.d_model or base_cfg.d_model,
        heads=base_cfg.heads,
        batch=args.batch or base_cfg.batch,
        seq=args.seq or base_cfg.seq,
    )
    out = common.Output()
    common.init_single_process_group()
    base = os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    trainer = Trainer(cfg, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} torch thread(s)"
    out(f"# e2e_snapshot, {time.strftime('%Y-%m-%d %H:%M')}: {where}; {common.machine()}")
    out(
        f"state {trainer.nbytes / 1e9:.3f} GB ({trainer.params / 1e6:.1f}M parameters + AdamW, "
        f"{len(trainer.tensors())} tensors); {cfg}; snapshots after steps {args.at} of {args.steps}; "
        f"{args.reps} repetitions; snapshots in {base}"
    )
    out(common.load_average())

    methods: list[Method] = []
    skipped: dict[str, str] = {}
    for key in args.methods.split(","):
        cls = METHODS[key]
        reason = cls.unavailable(trainer)
        if reason is None:
            try:
                methods.append(cls(trainer, base))
                if isinstance(methods[-1], MoaiProcess):
                    out(f"{key}: writer process started and ready in {methods[-1].start_s:.2f} s (before the loops)")
                continue
            except Exception as exc:  # noqa: BLE001 - reported, and the other methods still run
                reason = f"{type(exc).__name__}: {exc}"
        skipped[key] = reason
        out(f"{key}: not run: {reason}")

    for _ in range(3):  # warm up kernels and the allocator
        trainer.step()
    run_loop(trainer, None, args, -1)
    loops: dict[str, list[Loop]] = {m.key: [] for m in methods}
    pairs: dict[str, list[Loop]] = {m.key: [] for m in methods}
    loads = []
    for rep in range(args.reps):
        if rep and args.budget_s and time.perf_counter() - began > args.budget_s:
            out(f"time budget of {args.budget_s:.0f} s spent: stopped after {rep} repetition(s)")
            break
        order = methods[rep % len(methods) :] + methods[: rep % len(methods)]
        for method in list(order):
            if method.key in skipped:
                continue
            common.settle(0.5)
            pairs[method.key].append(run_loop(trainer, None, args, rep))
            common.settle(0.5)
            try:
                loop = run_loop(trainer, method, args, rep)
            except Exception as exc:  # noqa: BLE001 - a peer failing here is a finding, not a crash
                skipped[method.key] = f"failed: {type(exc).__name__}: {exc}"
                out(f"{method.key}: failed in repetition {rep + 1}: {type(exc).__name__}: {exc}")
                pairs[method.key].pop()
                continue
            loops[method.key].append(loop)
            method.end_loop()
            base_step = pairs[method.key][-1].total / pairs[method.key][-1].steps
            out(
                f"rep {rep + 1} {method.key:<12} loop {loop.total:7.3f} s / {loop.steps} steps "
                f"(plain {pairs[method.key][-1].total:6.3f} s / {args.steps}), "
                f"extra {loop.total - loop.steps * base_step:+.3f} s" + (" (capped)" if loop.capped else "")
            )
        loads.append(os.getloadavg())
    for method in methods:
        if isinstance(method, MoaiAsync) and method.paths:
            out(f"{method.key}: persisted by {', '.join(sorted(set(method.paths)))} ({len(method.paths)} saves)")
        method.close()

    ran = [m for m in methods if loops[m.key]]
    summaries = [summarize(m, loops[m.key], pairs[m.key], len(args.at)) for m in ran]
    plain = [loop for key in pairs for loop in pairs[key]]
    step_s = common.median([loop.total / loop.steps for loop in plain])
    out("")
    out(
        f"plain loop: {common.median([loop.total for loop in plain]):.3f} s for {args.steps} steps "
        f"(median step {step_s * 1e3:.1f} ms); {common.load_average()}"
    )
    report(out, summaries, step_s)
    out("")
    out("blocking time of every call, in call order (s; * = the process's first call of the method):")
    for m in ran:
        out(f"  {m.label}: " + " ".join(f"{c.blocked:.4f}{'*' if c.first else ''}" for c in m.calls))
        if any(c.parts for c in m.calls):
            for part in m.calls[0].parts:
                out(f"    of which {part}: " + " ".join(f"{c.parts.get(part, float('nan')):.4f}" for c in m.calls))
    for key, reason in skipped.items():
        out(f"not measured: {key}: {reason}")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": where,
        "machine": common.machine(),
        "torch": torch.__version__,
        "config": asdict(cfg),
        "args": {k: v for k, v in vars(args).items()},
        "state_bytes": trainer.nbytes,
        "load_averages": loads,
        "plain_step_s": step_s,
        "summaries": [asdict(s) | {"extra_median": s.extra_median} for s in summaries],
        "calls": {m.key: [asdict(c) for c in m.calls] for m in ran},
        "persists": {m.key: [p.seconds for p in m.persists] for m in ran},
        "loops": {k: [asdict(loop) for loop in v] for k, v in loops.items()},
        "pairs": {k: [asdict(loop) for loop in v] for k, v in pairs.items()},
        "skipped": skipped,
    }
    name = f"e2e_snapshot_{device.type if device.type == 'cpu' else 'gpu'}"
    out.write_results(name, result, args.out, args.json)
    shutil.rmtree(base, ignore_errors=True)
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
