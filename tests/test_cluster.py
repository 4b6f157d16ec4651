"""A real two-node Ray cluster on this machine (two `ray start` raylets on loopback): a search runs its trials
on both nodes, and the storage check refuses a path one node cannot see. Each Ray client here is a subprocess,
so the cluster's auth token never mixes with the local Ray sessions of other tests."""

import json
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.test_search import SPACE as SEARCH_SPACE
from tune_xray.cluster import local_cluster
from tune_xray.record.names import RESULT_FILES

# the search tests' tiny space: two trials that both complete (no diverging warm start), one on each node
SPACE = {**{k: v for k, v in SEARCH_SPACE.items() if k != "warm_start"},
         "budget": {**SEARCH_SPACE["budget"], "trials": 2},
         "params": {"supervised.optimizer.lr": {"loguniform": [1.0e-3, 1.0e-2]}}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cluster")
    # each node its own torch.hub cache, as on machines of their own; downloads allowed (only 127.0.0.1 answers)
    caches = {name: {"TORCH_HOME": str(directory / f"{name}-torch"), "HF_HUB_OFFLINE": "0"}
              for name in ("head", "worker1")}
    with local_cluster(directory, nodes=2, cpus_per_node=1, node_env=caches) as c:
        yield c
    left = subprocess.run(["pgrep", "-f", str(c.temp_root)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the test cluster still running: {left}"


def _client(cluster, code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, cluster.address, *args], env=cluster.env,
                          capture_output=True, text=True, timeout=300)


def test_a_search_runs_its_trials_on_both_nodes_with_complete_records(cluster, tmp_path):
    """Storage given as a URI (file://, as s3:// would be): results reach the driver through the storage alone."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(SPACE))
    out = subprocess.run([sys.executable, "-m", "tune_xray.search", str(tmp_path / "tiny.yaml"), "--address",
                          cluster.address, "--storage", f"file://{tmp_path}/store", "--local-dir",
                          str(tmp_path / "local"), "--no-asha", "--ensemble-size", "2"],
                         env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    exp, stored = tmp_path / "local" / "tiny", tmp_path / "store" / "tiny"
    summary = json.loads((exp / "summary.json").read_text())
    nodes = _client(cluster, "import ray, sys; ray.init(address=sys.argv[1]); "
                             "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))").stdout.split()
    assert len(nodes) == 2
    assert {r["node_id"] for r in summary["rows"]} == set(nodes)  # one trial on each node

    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    for row in summary["rows"]:
        assert row["status"] == "complete"
        trial_dir = f"{row['trial']}-{row['trial_id']}"
        for name in ("best.pt", "predictions_val.csv", "predictions_test.csv", "summary.json", "config.yaml"):
            assert (stored / trial_dir / name).is_file() and (exp / trial_dir / name).is_file(), f"{trial_dir}: {name}"
        assert any(p.name.startswith("checkpoint_") for p in (stored / trial_dir).iterdir())
        assert {p.name for p in (exp / trial_dir).iterdir()} <= set(RESULT_FILES)  # no checkpoint fetched
        run = client.get_run(row["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["tune_xray.node_id"] == row["node_id"]
        assert {"best.pt", "predictions_val.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    assert summary["ensemble"]["registered"]  # chosen from the fetched predictions
    for name in ("search.json", "summary.json", "ensemble/model_card.md"):  # the search's own files, on storage
        assert (stored / name).is_file(), name


def test_each_node_fills_its_cache_once_however_many_trials_it_runs(cluster, tmp_path):
    """The driver fetches a study's files before Ray's trials start; a node whose cache lacks one fetches it with its
    first trial that needs it, under a file lock: once per node, never once per trial."""
    import hashlib

    import timm

    from tests.loopback import Loopback, torch_file

    body = torch_file(timm.create_model("test_resnet").state_dict())
    digest = hashlib.sha256(body).hexdigest()
    path = f"/w/test_resnet-{digest[:8]}.pth"
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**SPACE, "budget": {**SPACE["budget"], "trials": 4}}))
    with Loopback() as server:
        url = server.serve(path, body)
        out = subprocess.run([sys.executable, "-m", "tune_xray.search", str(tmp_path / "tiny.yaml"), "--address",
                              cluster.address, "--storage", str(tmp_path / "store"), "--no-asha", "--no-ensemble",
                              "--no-report", "--set", "supervised.epochs=1", "--set", f"model.pretrained={url}"],
                             env={**cluster.env, "TORCH_HOME": str(tmp_path / "driver-torch"), "HF_HUB_OFFLINE": "0"},
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "under a file lock (once per node)" in out.stdout
    summary = json.loads((tmp_path / "store" / "tiny" / "summary.json").read_text())
    assert summary["complete"] == 4
    assert {r["started_from"]["test_resnet"]["sha256"] for r in summary["rows"]} == {digest}
    nodes = {r["node_id"] for r in summary["rows"]}
    assert len(nodes) == 2  # two trials at a time, one on each node's one CPU
    assert server.gets[path] == 1 + len(nodes)  # the driver's fetch, then one per node that ran a trial
    filled = [name for name in ("head", "worker1")
              if (cluster.directory / f"{name}-torch" / "hub" / "checkpoints" / path.split("/")[-1]).is_file()]
    assert len(filled) == len(nodes)


CHECK = """
import ray, sys
from tune_xray.cluster import check_cluster_paths
from tune_xray.config import ConfigError
ray.init(address=sys.argv[1])
head = ray.get_runtime_context().get_node_id()
check_cluster_paths(sys.argv[2], sys.argv[3])  # one directory all nodes see: passes
# the other node names both paths as a directory of its own, as a node-local disk would be
local = lambda path, node: path if node == head else f"{sys.argv[4]}/{node}{path}"
try:
    check_cluster_paths(sys.argv[2], sys.argv[3], node_view=local)
except ConfigError as err:
    print(err)
"""


def test_storage_and_data_one_node_cannot_see_are_one_error_naming_it(cluster, tmp_path):
    storage, data = tmp_path / "store", tmp_path / "data"
    data.mkdir()
    out = _client(cluster, CHECK, str(storage), str(data), str(tmp_path / "node-local"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"--storage {storage}: what these nodes write there does not reach the driver")
    assert "must be shared" in lines[0] and "127.0.0.2" in lines[0]
    assert lines[1].startswith(f"--data {data}: not visible on")
    assert not any(p.name.startswith(".tune_xray") for p in storage.rglob("*"))  # no marker left behind
    assert not any(p.name.startswith(".tune_xray") for p in (tmp_path / "node-local").rglob("*"))


def test_trials_waiting_for_resources_run_together_once_a_node_brings_them(tmp_path):
    """A cluster with no room for a trial when the search starts (the head's one CPU; a trial needs two) that gains
    a node of four CPUs afterwards runs both trials at once: no concurrency cap fixed from the start-up resources,
    which on an autoscaling cluster whose GPU workers start from zero meant one trial at a time."""
    # three epochs: a trial outlasts the start of the next one's process, so running together shows as overlap
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**SPACE, "budget": {**SPACE["budget"], "epochs": 3}}))
    experiment = tmp_path / "store" / "tiny"
    with local_cluster(tmp_path / "cluster", nodes=1, cpus_per_node=1) as cluster:
        search = subprocess.Popen([sys.executable, "-m", "tune_xray.search", str(tmp_path / "tiny.yaml"), "--address",
                                   cluster.address, "--storage", str(tmp_path / "store"), "--cpus-per-trial", "2",
                                   "--no-asha", "--no-ensemble", "--no-report"],
                                  env=cluster.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        deadline = time.monotonic() + 300
        while not any(experiment.glob("experiment_state-*.json")):  # Tune runs, its trials wait for room
            assert search.poll() is None and time.monotonic() < deadline, search.communicate()[1][-3000:]
            time.sleep(0.5)
        cluster.add_node(cpus=4)
        _, err = search.communicate(timeout=600)
    assert search.returncode == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{experiment / 'mlflow.db'}")
    runs = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
            if "tune_xray.trial_id" in r.data.tags]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    first, second = runs
    assert first.info.start_time < second.info.end_time and second.info.start_time < first.info.end_time
