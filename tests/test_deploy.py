"""The deploy files parse, and every search command they (and the README) give is the CLI's real syntax."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tune_xray.command import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _search_commands(text: str) -> list[str]:
    """Every `python -m tune_xray.search …` in a text, up to the end of its line (a shell's `\\` continuation
    joined) or shell quote."""
    return [m.group(1) for m in re.finditer(r"python -m tune_xray\.search ([^\"\n`|]*)", text.replace("\\\n", " "))]


def _parse(command: str):
    words = shlex.split(command.split(" #")[0])
    return build_parser().parse_args(words)  # argparse exits (SystemExit) on an unknown flag or a bad value


def test_ray_up_cluster_yaml():
    cfg = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head drives the search, trials run on GPU workers
    worker = nodes["gpu_worker"]
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= cfg["max_workers"]
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if c.startswith("RAY_AUTH_MODE") or "ray start" in c)
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    commands = _search_commands((DEPLOY / "ray-cluster.yaml").read_text())
    assert commands and all(_parse(c).address == "auto" and _parse(c).storage.startswith("s3://") for c in commands)


def test_kuberay_rayjob_runs_the_search_on_shared_storage():
    job = yaml.safe_load((DEPLOY / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    args = _parse(job["spec"]["entrypoint"].removeprefix("python -m tune_xray.search "))
    assert args.study == "byol" and args.address == "auto" and args.storage.startswith("s3://")
    assert args.tracking_uri.startswith("http://") and args.optuna_storage.startswith("postgresql://")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_dockerfile_installs_the_package_with_the_mamba_extra():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
    assert "cuda" in base and "devel" in base and "FROM ${CUDA_IMAGE}" in text  # nvcc: mamba-ssm may compile
    assert 'pip install --no-build-isolation -e ".[mamba]"' in text
    extras = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^mamba = ", extras, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for copied in line.split()[:-1]:
            assert (ROOT / copied).exists(), f"Dockerfile copies {copied}, which the repository lacks"


@pytest.mark.parametrize("source", ["README.md", "deploy/ray-cluster.yaml", "scripts/local_cluster.py"])
def test_every_documented_search_command_parses(source):
    commands = _search_commands((ROOT / source).read_text())
    assert commands
    for command in commands:
        _parse(command.replace("{address}", "127.0.0.2:6379"))
