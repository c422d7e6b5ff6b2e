"""Op capture: what the stream holds, its hashes, its storage checks, and the run's capture policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moai_ckpt.errors import UnsafeKeyError, UnsupportedFormatError
from moai_ckpt.storage import open_storage
from replay.log import Placement
from replay.opreplay import OpReplayer, check_replayable, resolve
from replay.ops import OpCaptureError, OpRecorder, decode_digest, digest, mark_batch
from replay.opstore import CorruptCaptureError, list_captures, read_capture, write_capture
from tests.scenarios.ops_scenario import build, one_step


def _captured_steps(steps: int = 2) -> list:
    model, opt, data, targets = build()
    streams = []
    for step in range(1, steps + 1):
        x, y = data[step * 8 : step * 8 + 8], targets[step * 8 : step * 8 + 8]
        hooks = [
            opt.register_step_pre_hook(lambda *_: rec.set_phase("optimizer")),
        ]
        with OpRecorder(step, {"model": model, "optim": opt}) as rec:
            mark_batch(x, y)
            loss, grad_norm = one_step(model, opt, x, y)
        for h in hooks:
            h.remove()
        streams.append(rec.finish(results={"loss": loss, "grad_norm": grad_norm}))
    return streams


def test_the_stream_holds_forward_backward_and_optimizer_ops_and_names_every_external() -> None:
    first, second = _captured_steps(2)
    phases = {op["phase"] for op in second.ops}
    assert {"forward", "backward", "optimizer"} <= phases
    backward = [op["op"] for op in second.ops if op["phase"] == "backward"]
    assert "aten.native_layer_norm_backward.default" in backward and "aten.mm.default" in backward
    optimizer = [op["op"] for op in second.ops if op["phase"] == "optimizer"]
    assert any(name.startswith("aten.addcdiv_") for name in optimizer)  # Adam's update, in place
    sources = set(second.externals.values())
    assert {"param/model/up.weight", "param/model/norm.bias", "buffer/model/scale", "batch"} <= sources
    assert "optim/optim/0/exp_avg" in sources and "optim/optim/0/exp_avg_sq" in sources  # step 2: Adam has state
    assert not any(s.startswith("optim/") for s in first.externals.values())  # step 1 creates it
    # the parameters are written in place by the optimizer: their final value ids are new values
    up = next(v for v, s in second.externals.items() if s == "param/model/up.weight")
    assert second.finals["param/model/up.weight"] != up
    assert second.values[second.finals["param/model/up.weight"]]["by"] >= 0
    # random ops keep their draws (dropout's mask); the loss is a named result
    assert any(op.get("rng") for op in second.ops)
    assert isinstance(second.results["loss"], int)


def _reference_hash(t: torch.Tensor) -> int:
    """sum_i (i*K1 + K2) * word_i mod 2^64, computed in Python integers."""
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    words = np.frombuffer(raw, dtype=f"<i{t.element_size()}").tolist()
    k1, k2 = 0x9E3779B97F4A7C16, 0x2545F4914F6CDD1D
    return sum(((i * k1 + k2) % 2**64) * w for i, w in enumerate(words)) % 2**64


def test_the_exact_hash_is_the_position_weighted_word_sum_in_any_memory_layout() -> None:
    x = torch.randn(5, 7)
    h, norm, _ = decode_digest(digest(x).tolist())
    assert int(h, 16) == _reference_hash(x)
    assert norm == float(np.linalg.norm(x.double().numpy()))
    assert decode_digest(digest(x.t().contiguous().t()).tolist())[0] == h  # strides do not matter
    y = x.clone()
    y.view(torch.int32)[3, 4] ^= 1  # one bit of one element
    assert decode_digest(digest(y).tolist())[0] != h
    swapped = x.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same elements in another order
    assert decode_digest(digest(swapped).tolist())[0] != h
    assert int(decode_digest(digest(x.bfloat16()).tolist())[0], 16) == _reference_hash(x.bfloat16())


def test_a_stored_capture_reads_back_and_refuses_torn_corrupt_and_unknown_versions(tmp_path: Path) -> None:
    (stream,) = _captured_steps(1)
    storage = open_storage(str(tmp_path / "run"))
    write_capture(storage, stream, "c1-test", Placement())
    back = read_capture(storage, 1, "c1-test")
    assert back.ops == stream.ops and back.values == stream.values
    assert all(torch.equal(back.blobs[v], stream.blobs[v]) for v in stream.blobs)
    prefix = "log/ops/000000000001/c1-test/rank-00000"
    root = tmp_path / "run" / prefix
    data = bytearray((root / "values.bin").read_bytes())
    data[len(data) // 2] ^= 0x10
    (root / "values.bin").write_bytes(bytes(data))
    with pytest.raises(CorruptCaptureError, match=r"does not match capture\.json"):
        read_capture(storage, 1, "c1-test")
    index = json.loads((root / "capture.json").read_text())
    (root / "capture.json").write_text(json.dumps({**index, "version": 9}))
    with pytest.raises(UnsupportedFormatError, match="version 9"):
        read_capture(storage, 1, "c1-test")
    (root / "capture.json").write_text(json.dumps({**index, "ops": index["ops"] + 1}))
    with pytest.raises(CorruptCaptureError, match="its own checksum"):
        read_capture(storage, 1, "c1-test")
    (root / "capture.json").unlink()
    with pytest.raises(CorruptCaptureError, match="torn"):
        read_capture(storage, 1, "c1-test")
    assert list_captures(storage)[0].torn == (0,)
    with pytest.raises(UnsafeKeyError):
        read_capture(storage, 1, "../../snapshots")


def test_code_free_replay_runs_only_aten_ops_of_single_process_captures() -> None:
    with pytest.raises(OpCaptureError, match="not an aten or prims op"):
        resolve("moai_test.ordered_sum.default")
    with pytest.raises(OpCaptureError, match="not <namespace>"):
        resolve("aten.__class__.__init__.x")
    (stream,) = _captured_steps(1)
    stream.world_size = 2
    with pytest.raises(OpCaptureError, match="single-process"):
        check_replayable(stream)
    stream.world_size = 1
    stream.ops.append({"op": "c10d.allreduce_.default", "a": [], "k": {}, "o": None, "m": []})
    with pytest.raises(OpCaptureError, match=r"collectives: c10d\.allreduce_"):
        OpReplayer(stream, torch.device("cpu"), {})
