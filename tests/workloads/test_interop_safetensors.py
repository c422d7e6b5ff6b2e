"""Snapshots exported to safetensors: loaded back by ``safetensors`` itself and by ``transformers.from_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from moai_ckpt import Checkpointer, ChecksumError, PartialState, cli
from moai_ckpt.interop import InteropError, export_safetensors, read_state
from moai_ckpt.layout import snapshot_dir

transformers = pytest.importorskip("transformers", reason="the from_pretrained tests need transformers")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equality is bitwise (NaN payloads and -0.0 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(actual)
    for name, tensor in expected.items():
        other = actual[name]
        assert other.dtype == tensor.dtype, name
        assert other.shape == tensor.shape, name
        assert torch.equal(_bits(tensor), _bits(other)), name


def tiny_llama(tied: bool) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # a training step, so the weights are no longer what from_config would rebuild from a seed
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shard", ["5GB", "20000"], ids=["one-file", "sharded"])
def test_exported_transformers_model_loads_with_from_pretrained_bitwise(tmp_path: Path, tied: bool, shard: str) -> None:
    model = tiny_llama(tied)
    run, out = str(tmp_path / "run"), tmp_path / "hf"
    with Checkpointer(run) as ckpt:
        ckpt.save(5, {"model": model, "extra": {"note": "not weights"}})
    _run_cli("export", run, "--format", "safetensors", "--to", str(out), "--max-shard-size", shard)
    model.config.save_pretrained(out)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")

    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert_bitwise(model.state_dict(), loaded.state_dict())
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    files = sorted(p.name for p in out.glob("model*.safetensors"))
    if shard == "5GB":
        assert files == ["model.safetensors"]
        assert not (out / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 1


def test_shard_index_maps_every_name_and_counts_each_tensor_once(tmp_path: Path) -> None:
    model = tiny_llama(tied=True)
    run, out = str(tmp_path / "run"), tmp_path / "hf"
    with Checkpointer(run) as ckpt:
        ckpt.save(1, {"model": model})
    limit = 20000
    result = export_safetensors(run, out, max_shard_size=limit)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    live = model.state_dict()
    assert sorted(index["weight_map"]) == sorted(live)
    distinct = {t.data_ptr(): t.numel() * t.element_size() for t in live.values()}
    assert index["metadata"]["total_size"] == sum(distinct.values()) == result.total_size
    assert result.files[-1] == "model.safetensors.index.json"
    for filename in set(index["weight_map"].values()):
        with safe_open(out / filename, framework="pt") as f:
            assert f.metadata()["format"] == "pt"
            names = list(f.keys())
        assert all(index["weight_map"][n] == filename for n in names)
        stored = {live[n].data_ptr(): live[n].nbytes for n in names}  # a tied pair counts once
        assert sum(stored.values()) <= limit or len(stored) == 1
    # the tied pair lands in one shard, as transformers places it
    assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]


class AllDtypes(torch.nn.Module):
    """Parameters and buffers in every dtype a training job stores, odd shapes included."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w_bf16 = torch.nn.Parameter(torch.randn(7, 5, generator=g).to(torch.bfloat16))
        self.w_f16 = torch.nn.Parameter(torch.randn(3, 2, generator=g).half())
        self.w_f32 = torch.nn.Parameter(torch.randn(4, generator=g))
        self.w_f64 = torch.nn.Parameter(torch.randn(2, 2, generator=g).double())
        self.register_buffer("f8_e4m3", torch.randn(6, 3, generator=g).to(torch.float8_e4m3fn))
        self.register_buffer("f8_e5m2", torch.randn(6, 3, generator=g).to(torch.float8_e5m2))
        self.register_buffer("count", torch.tensor(12345678901, dtype=torch.int64))
        self.register_buffer("mask", torch.rand(5, generator=g) > 0.5)
        self.register_buffer("codes", torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g))
        self.register_buffer("nothing", torch.empty(0, 4, dtype=torch.bfloat16))
        self.register_buffer("special", torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.bfloat16))


def test_safetensors_round_trip_keeps_every_dtype_and_bit(tmp_path: Path) -> None:
    module = AllDtypes()
    run = str(tmp_path / "run")
    with Checkpointer(run, chunk_bytes=16) as ckpt:  # many chunks per array
        ckpt.save(2, {"weights": module})
    result = export_safetensors(run, tmp_path / "out", key="weights")

    assert result.files == ["model.safetensors"]
    assert_bitwise(module.state_dict(), load_file(tmp_path / "out" / "model.safetensors"))


class Stage(PartialState):
    """One pipeline stage's parameters, named by whole-model name, as a placed run stores them."""

    def __init__(self, entries: dict[str, torch.Tensor]) -> None:
        self.entries = entries

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.entries

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.entries = state

    def holds(self) -> list[str]:
        return list(self.entries)


def test_partial_model_of_a_placed_run_exports_by_whole_model_names(tmp_path: Path) -> None:
    entries = {"blocks.0.w": torch.randn(4, 4).to(torch.bfloat16), "blocks.1.w": torch.randn(4, 4)}
    run = str(tmp_path / "run")
    with Checkpointer(run) as ckpt:
        ckpt.save(1, {"model": Stage(entries)})
        assert ckpt.manifest(1).objects["model"].kind == "partial"
    export_safetensors(run, tmp_path / "out")
    assert_bitwise(entries, load_file(tmp_path / "out" / "model.safetensors"))


def test_flat_json_entry_of_tensors_exports_and_skips_other_values(tmp_path: Path) -> None:
    weights = {"a": torch.randn(3), "b": {"c": torch.ones(2, dtype=torch.bfloat16)}, "step": 4, "name": "x"}
    run = str(tmp_path / "run")
    with Checkpointer(run) as ckpt:
        ckpt.save(1, {"weights": weights})
    result = export_safetensors(run, tmp_path / "out", key="weights")

    assert sorted(result.skipped) == ["name", "step"]
    assert_bitwise({"a": weights["a"], "b.c": weights["b"]["c"]}, load_file(tmp_path / "out" / "model.safetensors"))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optim.step()
    run = str(tmp_path / "run")
    with Checkpointer(run) as ckpt:
        ckpt.save(1, {"model": model, "optim": optim, "big": {"weight": torch.zeros(4, 4, dtype=torch.complex128)}})
    return run, model


def test_missing_entry_is_refused_with_the_entries_it_holds(saved: tuple[str, torch.nn.Module], tmp_path: Path) -> None:
    run, _ = saved
    with pytest.raises(InteropError, match=r"no entry 'weights'.*\['big', 'model', 'optim'\]") as info:
        export_safetensors(run, tmp_path / "out", key="weights")
    assert info.value.step == 1 and info.value.key == "weights"
    assert not (tmp_path / "out").exists()


def test_optimizer_entry_and_unsupported_dtypes_are_refused_before_writing(
    saved: tuple[str, torch.nn.Module], tmp_path: Path
) -> None:
    run, _ = saved
    with pytest.raises(InteropError, match="is of kind optimizer"):
        export_safetensors(run, tmp_path / "out", key="optim")
    with pytest.raises(InteropError, match="complex128 has no safetensors type") as info:
        export_safetensors(run, tmp_path / "out", key="big")
    assert info.value.key == "big.weight"
    assert not (tmp_path / "out").exists()


def test_existing_files_are_kept_unless_overwrite_and_stale_shards_go(
    saved: tuple[str, torch.nn.Module], tmp_path: Path
) -> None:
    run, model = saved
    out = tmp_path / "out"
    first = export_safetensors(run, out, max_shard_size=20000)
    assert len(first.files) >= 3 and first.files[-1] == "model.safetensors.index.json"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(InteropError, match="already holds"):
        export_safetensors(run, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    export_safetensors(run, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert_bitwise(model.state_dict(), load_file(out / "model.safetensors"))


def test_corrupt_chunk_fails_the_export_and_leaves_no_model_file(
    saved: tuple[str, torch.nn.Module], tmp_path: Path
) -> None:
    run, _ = saved
    chunk = Path(run) / snapshot_dir(1) / "model" / "0.weight" / "c.0.0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))

    with pytest.raises(ChecksumError) as info:
        export_safetensors(run, tmp_path / "out")
    assert info.value.key is not None and info.value.key.endswith("model/0.weight/c.0.0")
    assert list((tmp_path / "out").iterdir()) == []


def test_an_output_path_that_is_a_file_is_a_clear_error(saved: tuple[str, torch.nn.Module], tmp_path: Path) -> None:
    run, _ = saved
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(InteropError, match="cannot write the export") as info:
        export_safetensors(run, tmp_path / "taken")
    assert info.value.url == str(tmp_path / "taken")


def test_cli_errors_are_one_line_with_exit_code_2(saved: tuple[str, torch.nn.Module], tmp_path: Path) -> None:
    run, _ = saved
    result = CliRunner().invoke(cli.app, ["export", run, "--to", str(tmp_path / "o"), "--max-shard-size", "lots"])
    assert result.exit_code == 2
    assert "max shard size 'lots'" in result.output


def test_read_state_gives_the_entries_as_plain_values(saved: tuple[str, torch.nn.Module]) -> None:
    run, model = saved
    state = read_state(run)
    assert sorted(state) == ["big", "model", "optim"]
    assert_bitwise(model.state_dict(), state["model"])
    assert sorted(read_state(run, keys=["optim"])["optim"]) == ["param_groups", "state"]
