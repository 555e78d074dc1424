"""One GPU per worker: `device: auto` follows CUDA_VISIBLE_DEVICES; the pool templates hand a run one GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ood_core.models import describe_device, resolve_device

POOLS = Path(__file__).resolve().parent.parent / "deploy" / "work-pools"


def _render(name: str, values: dict) -> dict:
    """A pool template's job configuration with its defaults and ``values``, as a worker builds it."""
    from prefect.utilities.templating import apply_values

    template = json.loads((POOLS / name).read_text())
    props = template["variables"]["properties"]
    defaults = {k: v.get("default") for k, v in props.items()}
    return apply_values(template["job_configuration"], {**defaults, **values})


def test_process_pool_leaves_the_gpu_to_each_workers_environment():
    for name in ("process.json", "process-cpu.json"):
        job = _render(name, {})
        # a pinned CUDA_VISIBLE_DEVICES here would put every worker's runs on one GPU
        assert "CUDA_VISIBLE_DEVICES" not in (job["env"] or {}), name


def test_docker_pool_hands_a_container_one_gpu_chosen_by_a_job_variable():
    job = _render("docker.json", {"gpu_device": "3"})
    [request] = job["container_create_kwargs"]["device_requests"]
    assert request["DeviceIDs"] == ["3"] and "Count" not in request  # Count: -1 meant all GPUs
    assert request["Capabilities"] == [["gpu"]]
    assert _render("docker.json", {})["container_create_kwargs"]["device_requests"][0]["DeviceIDs"] == ["0"]


def test_kubernetes_pool_requests_one_gpu_per_pod():
    job = _render("kubernetes-gpu.json", {})
    [container] = job["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1


def test_auto_device_is_the_first_gpu_the_worker_sees(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    device = resolve_device("auto")
    assert device == torch.device("cuda", 0)  # CUDA numbers the visible GPUs from 0
    assert describe_device(device) == "cuda:0 (host GPU 3 of CUDA_VISIBLE_DEVICES=3,5)"
    assert "host GPU 5" in describe_device(resolve_device("cuda:1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and describe_device(torch.device("cpu")) == "cpu"


def test_device_setting_accepts_one_gpu_and_names_the_choices():
    from ood_core.config import ConfigError, load_config

    assert load_config("tiny", ["models.device=cuda:1"]).models.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"models.device.*'cuda:N'.*got 'gpu1'"):
        load_config("tiny", ["models.device=gpu1"])
