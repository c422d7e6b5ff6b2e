"""Device inventory, the per-layer cost model and ``moai-ckpt plan``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from typer.testing import CliRunner

from moai_ckpt import cli
from moai_ckpt.errors import ProfileError
from parallel import costmodel, inventory
from parallel.costmodel import ProfileOptions, analytic_profile, cached_or_measured, find_layers, profile_model
from parallel.inventory import Device, local_device, parse_devices
from parallel.plan import Plan
from tests.scenarios.parallel_scenarios import IN, WIDTH, build_model, model_and_sample


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("device-cache")


@pytest.fixture(scope="module")
def cpu(cache_dir: Path) -> Device:
    return local_device("cpu", cache_dir=cache_dir)


# -- inventory ------------------------------------------------------------------------------------


def test_this_machine_is_measured_once_then_read_from_the_cache(
    cpu: Device, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cpu.source == "measured" and cpu.type == "CPU" and cpu.flops > 1e8 and cpu.memory_bandwidth > 1e8
    assert json.loads((cache_dir / "devices.json").read_text())["format"] == inventory.CACHE_FORMAT

    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("probed again")

    monkeypatch.setattr(inventory, "probe", no_probe)
    again = local_device("cpu", cache_dir=cache_dir)
    assert (again.flops, again.memory_bandwidth) == (cpu.flops, cpu.memory_bandwidth)
    shared = local_device("cpu", cache_dir=cache_dir, ranks_sharing=4)
    share = min(1.0, (os.cpu_count() or 1) / (4 * torch.get_num_threads()))
    assert shared.flops == pytest.approx(cpu.flops * share)
    assert shared.memory_bytes == cpu.memory_bytes // 4


def test_an_unreadable_cache_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "devices.json").write_text("{not json")
    measured = inventory.ProbeResult(flops=1e9, memory_bandwidth=1e9, measured="now", torch="x")
    monkeypatch.setattr(inventory, "probe", lambda *a, **k: measured)
    assert local_device("cpu", cache_dir=tmp_path).flops == 1e9 * min(
        1.0, (os.cpu_count() or 1) / torch.get_num_threads()
    )


# -- the layer sequence ---------------------------------------------------------------------------


class Tower(nn.Module):
    def __init__(self, reverse: bool = False, embed: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)])
        self.embed = nn.Linear(8, 8) if embed else None
        self.reverse = reverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks) if self.reverse else self.blocks:
            x = block(x)
        return x


def test_a_single_module_list_child_is_the_layer_sequence() -> None:
    assert [name for name, _ in find_layers(Tower())] == ["blocks.0", "blocks.1", "blocks.2"]
    model = Tower()
    with pytest.raises(ProfileError, match="is not a submodule"):
        find_layers(model, [model.blocks[0], nn.Linear(8, 8)])


def test_parameters_outside_the_layers_are_refused_by_name() -> None:
    with pytest.raises(ProfileError, match=r"embed\.weight.*layers=") as info:
        find_layers(Tower(embed=True))
    assert isinstance(info.value, ValueError)


def test_layers_the_model_does_not_run_in_order_are_refused() -> None:
    with pytest.raises(ProfileError, match="differs from running its 3 layers in order"):
        profile_model(Tower(reverse=True), torch.randn(4, 8), options=ProfileOptions(repeats=1, warmup=0))


# -- profiles -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(cpu: Device) -> costmodel.ModelProfile:
    model, sample = model_and_sample()
    return profile_model(model, sample, device=cpu)


def test_a_profile_counts_each_layers_parameters_flops_and_saved_activations(
    measured: costmodel.ModelProfile, cpu: Device
) -> None:
    model = build_model()
    assert measured.num_layers == len(model) == 13
    assert measured.params == sum(p.numel() for p in model.parameters())
    first, tanh = measured.layers[0], measured.layers[1]
    assert (first.kind, tanh.kind) == ("Linear", "Tanh")
    assert first.optimizer_bytes == 8 * first.params and first.grad_bytes == first.param_bytes
    assert first.forward_flops == 2 * IN * WIDTH  # per sample
    assert first.backward_flops == 2 * first.forward_flops  # input and weight gradients
    assert first.activation_bytes == IN * 4  # the input it saves; the weight is not an activation
    assert tanh.activation_bytes == WIDTH * 4 == tanh.output_bytes  # tanh saves its output
    assert tanh.params == 0 and tanh.forward_flops == 0
    times = measured.layer_times(cpu, measured.micro_batch)
    assert all(f >= 0 and b >= 0 for f, b in times) and sum(f + b for f, b in times) > 0
    h100 = parse_devices("H100")[0]
    assert sum(map(sum, measured.layer_times(h100, 16))) < sum(map(sum, times))


def test_an_analytic_profile_counts_the_same_without_timing(measured: costmodel.ModelProfile, cpu: Device) -> None:
    model, sample = model_and_sample()
    counted = analytic_profile(model, sample, device=cpu)
    assert counted.source == "analytic" and counted.model_hash == measured.model_hash
    assert counted.key.endswith("-analytic.json") and counted.key != measured.key
    for a, m in zip(counted.layers, measured.layers, strict=True):
        assert (a.forward_flops, a.backward_flops, a.activation_bytes, a.output_bytes) == (
            m.forward_flops,
            m.backward_flops,
            m.activation_bytes,
            m.output_bytes,
        )
        assert a.forward_s is None
    assert all(p.device.type == "cpu" for p in model.parameters())  # the user's model is not moved


def test_an_analytic_profile_of_a_model_on_the_meta_device_needs_no_memory(cpu: Device) -> None:
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(8192, 8192, bias=False) for _ in range(4)])
    profile = analytic_profile(model, torch.empty(2, 512, 8192, device="meta"), device=cpu)
    params = 8192 * 8192
    assert [layer.params for layer in profile.layers] == [params] * 4
    assert profile.layers[1].forward_flops == pytest.approx(2 * params * 512)  # 2 x params x tokens
    assert profile.layers[1].backward_flops == pytest.approx(4 * params * 512)
    plan_time = profile.layer_times(parse_devices("H100")[0], 8)
    assert plan_time[0][0] > 0


def test_a_profile_is_cached_in_the_run_directory(
    tmp_path: Path, measured: costmodel.ModelProfile, cpu: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, sample = model_and_sample()
    url = str(tmp_path / "run")
    first = cached_or_measured(url, model, sample, device=cpu)
    assert first.key == f"plans/profile-CPU-{first.model_hash}.json"
    assert (tmp_path / "run" / first.key).exists()

    def no_profile(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(costmodel, "profile_model", no_profile)
    assert cached_or_measured(url, model, sample, device=cpu) == first


def test_profile_options_name_the_bad_option() -> None:
    with pytest.raises(ValidationError, match="repeats"):
        ProfileOptions(repeats=0)
    with pytest.raises(ValidationError, match="optimizer_bytes_per_param"):
        ProfileOptions(optimizer_bytes_per_param=-1)


# -- moai-ckpt plan -------------------------------------------------------------------------------


def invoke(*args: str, cache: Path) -> tuple[int, str]:
    env = {"COLUMNS": "160", "XDG_CACHE_HOME": str(cache)}
    result = CliRunner().invoke(cli.app, list(args), env=env)
    return result.exit_code, result.output


def test_plan_profiles_a_model_caches_it_and_prints_the_candidates(tmp_path: Path, cache_dir: Path) -> None:
    url = str(tmp_path / "run")
    model = "tests.scenarios.parallel_scenarios:model_and_sample"
    code, output = invoke(
        "plan", url, "--devices", "2xH100,1xA100", "--global-batch", "64", "--model", model, cache=cache_dir
    )
    assert code == 0, output
    assert "placements of 13 layers on 2xH100-SXM,1xA100-80GB, global batch 64" in output
    assert "chosen" in output and "stage" in output
    assert list((tmp_path / "run" / "plans").iterdir())
    # the cached profile is enough the second time
    code, output = invoke("plan", url, "--devices", "4xCPU", "-b", "32", "--json", cache=cache_dir)
    assert code == 0, output
    plan = Plan.model_validate_json(output)
    assert plan.global_batch == 32 and plan.dp * plan.chosen.micro_batches * plan.chosen.micro_batch_size == 32


def test_plan_refuses_devices_that_are_too_small_with_one_line(tmp_path: Path, cache_dir: Path) -> None:
    model = "tests.scenarios.parallel_scenarios:model_and_sample"
    code, output = invoke(
        "plan", "--devices", "2xCPU:64KB", "-b", "16", "--model", model, "--analytic", cache=cache_dir
    )
    assert code == 2
    assert "does not fit" in output and "needs" in output and "usable" in output


def test_plan_without_a_profile_says_what_to_pass(tmp_path: Path, cache_dir: Path) -> None:
    code, output = invoke("plan", str(tmp_path / "empty"), "-b", "8", "--devices", "H100", cache=cache_dir)
    assert code == 2 and "--model" in output
    code, output = invoke("plan", "-b", "8", "--devices", "H100", "--model", "no_such_module:f", cache=cache_dir)
    assert code == 2 and "cannot import no_such_module" in output
