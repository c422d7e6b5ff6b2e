"""What op capture costs: a captured step against a plain one, and a run with capture off.

One GPT-style training step (`benchmarks/gpt.py`: AdamW, grad clipping, dropout; bf16 autocast
on CUDA), timed over ``--steps`` steps after ``--warmup``, in one process, variants interleaved
over ``--reps`` repetitions (medians):

- ``plain``: the step alone (the floor);
- ``captured``: the same step under `replay.ops.OpRecorder`, digests read back, and the capture
  written to a local run directory (`replay.opstore.write_capture`); the time to write is also
  shown on its own;
- ``run, capture off``: the step inside ``fault_tolerant(capture_ops="never")``, against the same
  loop with ``capture_ops="on_divergence"`` (the default; also no hooks): capture off costs a run
  two ``is not None`` checks a step, measured here by the difference of the two (noise on this
  scale) and counted directly with ``--count-checks``.

    python benchmarks/op_capture.py --size cpu-small --batch 4 --steps 6 --reps 3
    python benchmarks/op_capture.py --size gpt2-small --batch 8 --device cuda --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from contextlib import nullcontext
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, SIZES, loss_fn

import moai_ckpt
from moai_ckpt.layout import capture_step_dir
from moai_ckpt.storage import open_storage
from replay.log import Placement
from replay.ops import OpRecorder
from replay.opstore import write_capture


class Setup:
    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.cfg = SIZES[args.size]
        self.device = torch.device(args.device)
        self.model = GPT(self.cfg).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1)
        gen = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, self.cfg.vocab, (256, self.cfg.ctx + 1), generator=gen).to(self.device)
        self.batch = args.batch
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        self.i = 0

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.i = (self.i + self.batch) % (len(self.tokens) - self.batch)
        with self.autocast:
            loss = loss_fn(self.model, self.tokens[self.i : self.i + self.batch])
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_and_captured(args: argparse.Namespace, directory: str) -> dict[str, float]:
    s = Setup(args)
    storage = open_storage(directory)
    for _ in range(args.warmup):
        s.step()
    plain, captured, writing, ops, nbytes = [], [], [], 0, 0
    for i in range(args.steps):
        sync(s.device)
        t0 = time.perf_counter()
        s.step()
        sync(s.device)
        t1 = time.perf_counter()
        with OpRecorder(i + 1, {"model": s.model, "optim": s.opt}) as rec:
            loss, grad_norm = s.step()
        stream = rec.finish(results={"loss": loss, "grad_norm": grad_norm})
        t2 = time.perf_counter()
        index = write_capture(storage, stream, f"c{i:04d}-bench", Placement(device_type=s.device.type))
        t3 = time.perf_counter()
        storage.delete_prefix(capture_step_dir(i + 1))  # keep the disk free: one capture at a time
        plain.append(t1 - t0)
        captured.append(t3 - t1)
        writing.append(t3 - t2)
        ops, nbytes = index.ops, index.stream.size + index.data.size
    return {
        "plain": statistics.median(plain),
        "captured": statistics.median(captured),
        "write": statistics.median(writing),
        "ops": ops,
        "bytes": nbytes,
    }


def in_run(args: argparse.Namespace, directory: str, policy: str) -> float:
    result: dict[str, float] = {}

    @moai_ckpt.fault_tolerant(storage=directory, snapshot_every=10**9, snapshot_at_end=False, capture_ops=policy)
    def train(run: moai_ckpt.Run) -> None:
        s = Setup(args)
        run.track(model=s.model, optim=s.opt)
        start = 0.0
        for step in run.steps(args.warmup + args.steps):
            if step == args.warmup + 1:
                sync(s.device)
                start = time.perf_counter()
            loss, grad_norm = s.step()
            run.record(loss=loss, grad_norm=grad_norm)
        sync(s.device)
        result["per_step"] = (time.perf_counter() - start) / args.steps

    train()
    return result["per_step"]


def check_cost() -> float:
    """Seconds two ``is not None`` checks of an attribute take (what capture off adds to a step)."""

    class R:
        _ops = None

    r = R()
    n = 1_000_000
    return timeit.timeit("r._ops is not None; r._ops is not None", globals={"r": r}, number=n) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="cpu-small", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: dict[str, list[float]] = {}
    info: dict[str, Any] = {}
    for rep in range(args.reps):
        scratch = tempfile.mkdtemp(prefix="moai-bench-ops-")
        try:
            measured = plain_and_captured(args, os.path.join(scratch, "cap"))
            info = {"ops": measured["ops"], "bytes": measured["bytes"]}
            for key in ("plain", "captured", "write"):
                rows.setdefault(key, []).append(measured[key])
            rows.setdefault("run, capture off", []).append(in_run(args, os.path.join(scratch, "off"), "never"))
            rows.setdefault("run, default policy", []).append(
                in_run(args, os.path.join(scratch, "dflt"), "on_divergence")
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rows.items()}
    checks = check_cost()
    print(f"{args.size}, batch {args.batch}, {args.device}, {args.steps} steps x {args.reps} reps (medians)")
    print(f"{'variant':<24}{'ms / step':>12}{'vs plain':>10}  (range)")
    for name, values in rows.items():
        ratio = "" if name == "write" else f"{med[name] / med['plain']:.2f}x"
        print(f"{name:<24}{1e3 * med[name]:>12.1f}{ratio:>10}  ({1e3 * min(values):.1f}-{1e3 * max(values):.1f})")
    print(f"capture: {info['ops']} ops, {info['bytes'] / 1e6:.1f} MB stored per step")
    print(
        f"capture off, direct: two `is not None` checks = {checks * 1e9:.0f} ns a step "
        f"({100 * checks / med['plain']:.5f} % of a plain step)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_s": med, "runs_s": rows, "check_s": checks, **info, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
