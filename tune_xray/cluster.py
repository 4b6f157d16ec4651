"""Ray clusters: what a search checks before it runs on several nodes, and a cluster of several nodes on one
machine for trying (and testing) a multi-node search without renting one.

On a cluster every node writes checkpoints and results to `--storage` and reads its data from `--data`: both must
be the same place seen from every node (s3://, gs://, an NFS mount). Ray Train checks its own storage only when a
run starts, on the node that runs it; `check_cluster_paths` checks them all before any trial starts.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from .config import ConfigError
from .credentials import mask

MARKER_DIR = ".tune_xray-storage-check"
RAY_ENV = {
    # Train's controller polls workers this often (default 2 s): 0.5 s cuts the latency of each report
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
LOCAL_RAY_ENV = {
    # Ray runs workers at nice 15, so on a small machine its own processes preempt the training threads:
    # 4.6 → 3.7 s per epoch, 3.0 s without Ray (2 cores, bench_search_overhead.py)
    "RAY_worker_niceness": "0",
}


class _ForcedSnapshots(logging.Filter):
    """Tune warns at every epoch of a trial that checkpoints each epoch with `num_to_keep=1` that it snapshots
    the experiment state (so that a resume never points at a deleted checkpoint): that is the point, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "snapshotting has been triggered" not in record.getMessage()


def started_cluster() -> Optional[str]:
    """The address `ray start` recorded on this machine (Ray's bootstrap file: $RAY_TMPDIR, else $TMPDIR, else /tmp,
    then ray/ray_current_cluster), or None."""
    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    path = Path(temp) / "ray" / "ray_current_cluster"
    address = path.read_text().strip() if path.is_file() else ""
    return address or None


def which_ray(address: Optional[str] = None) -> tuple[Optional[str], str]:
    """(address, where it came from) of the Ray a search joins: `--address`, else RAY_ADDRESS, else the cluster
    `ray start` recorded on this machine; (None, "") for a Ray of its own. Never Ray's legacy "auto" address for
    `ray.init`, which joins any Ray process it finds here — another search's private one included, which then dies
    with that search. `--address auto` means the `ray start` cluster here."""
    for given, origin in ((address, "--address"), (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")):
        if given == "auto":
            recorded = started_cluster()
            if recorded is None:
                raise ConfigError(f"{origin} auto: no cluster was started here with `ray start` (a search with no "
                                  "address starts a Ray of its own)")
            return recorded, f"{origin} auto: the `ray start` cluster here"
        if given:
            return given, origin
    recorded = started_cluster()
    return (recorded, "the `ray start` cluster here") if recorded else (None, "")


def answers(address: str, timeout: float = 10.0) -> bool:
    """Whether something listens at a Ray address (`host:port`, or `ray://host:port`) within `timeout` seconds:
    a GCS that is gone would make ray.init retry every 5 s without end."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class RayUnreachable(RuntimeError):
    """The Ray a search was told to join does not answer."""


def connect(address: Optional[str] = None, verbose: bool = False) -> str:
    """Join the Ray `which_ray` names, else start one of its own; returns which, in words. A named Ray that does not
    answer is a RayUnreachable within seconds; a `ray start` record whose cluster is gone (it crashed) is passed
    over for a Ray of the search's own.

    A local start passes RAY_ENV by inheritance: a job-level runtime_env would keep Ray's prestarted worker
    processes from being used, and each actor of a trial would start its own (bench_search_overhead.py)."""
    import ray

    logging.getLogger("ray.tune.execution.experiment_state").addFilter(_ForcedSnapshots())
    if not verbose:  # Ray's start-up notices ("Started a local Ray instance", token auth on by default)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    quiet = {"logging_level": logging.INFO if verbose else logging.WARNING}
    target, origin = which_ray(address)
    if target is not None and answers(target):
        ray.init(address=target, runtime_env={"env_vars": RAY_ENV}, log_to_driver=verbose, **quiet)
        return f"the cluster at {target} ({origin})"
    if target is not None and origin != "the `ray start` cluster here":
        raise RayUnreachable(f"{origin} {target}: no Ray answers there (is the cluster up? without an address the "
                             "search starts a Ray of its own)")
    for key, value in {**RAY_ENV, **LOCAL_RAY_ENV}.items():
        os.environ.setdefault(key, value)  # the raylet and its workers inherit the driver's environment
    ray.init(address="local", log_to_driver=verbose, **quiet)  # never another one: a Ray of its own
    return "a Ray of its own" + (f" (the `ray start` record names {target}, which does not answer)" if target else "")


@contextmanager
def watch_ray(on_lost: Callable[[str], None], every: float = 2.0, misses: int = 3) -> Iterator[None]:
    """While the block runs, probe the GCS of the connected Ray every `every` seconds; after `misses` probes in a
    row find nothing listening there (the head node crashed, its processes were killed), call `on_lost(address)` from
    the watching thread. Without it Ray's core ends the process 60 s later from C++ (no Python cleanup: the search's
    MLflow runs stay RUNNING), or a driver waits on a cluster that is gone."""
    import threading

    import ray

    address, stop = ray.get_runtime_context().gcs_address, threading.Event()

    def watch() -> None:
        missed = 0
        while not stop.wait(every):
            missed = 0 if answers(address, timeout=every) else missed + 1
            if missed >= misses:
                on_lost(address)
                return

    thread = threading.Thread(target=watch, name="tune_xray-ray-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def alive_nodes() -> list[dict]:
    """The connected cluster's live nodes (Ray's node table: NodeID, NodeManagerAddress, Resources)."""
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def storage_filesystem(path: str):
    """(pyarrow filesystem, path on it) for a local path or an s3:// / gs:// URI, as Ray's storage resolves it."""
    from pyarrow import fs

    if "://" in path:
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), str(Path(path).resolve())


def upload(local: str | Path, destination: str) -> None:
    """A local file or directory to `destination` (a path or s3:// / gs:// URI), parents created."""
    from pyarrow.fs import LocalFileSystem, copy_files

    filesystem, path = storage_filesystem(destination)
    filesystem.create_dir(path if Path(local).is_dir() else path.rsplit("/", 1)[0], recursive=True)
    copy_files(str(local), path, source_filesystem=LocalFileSystem(), destination_filesystem=filesystem)


def download(source: str, local: str | Path) -> bool:
    """A file or directory at `source` (a path or URI) to `local`; False when there is nothing there."""
    from pyarrow.fs import FileType, LocalFileSystem, copy_files

    filesystem, path = storage_filesystem(source)
    kind = filesystem.get_file_info(path).type
    if kind not in (FileType.File, FileType.Directory):
        return False
    Path(local if kind == FileType.Directory else Path(local).parent).mkdir(parents=True, exist_ok=True)
    copy_files(path, str(local), source_filesystem=filesystem, destination_filesystem=LocalFileSystem())
    return True


def _write_marker(storage: str, name: str, token: str, data_path: Optional[str]) -> dict:
    """On one node: write `token` under the storage's marker directory; say whether the data path exists here."""
    import pyarrow as pa

    out = {"storage_error": None, "data_visible": data_path is None or Path(data_path).exists()}
    try:
        filesystem, root = storage_filesystem(storage)
        filesystem.create_dir(f"{root}/{MARKER_DIR}", recursive=True)
        with filesystem.open_output_stream(f"{root}/{MARKER_DIR}/{name}") as stream:
            stream.write(token.encode())
    except (OSError, pa.ArrowException) as err:
        out["storage_error"] = mask(f"{type(err).__name__}: {err}")
    return out


def _remove_markers(storage: str) -> None:
    try:
        filesystem, root = storage_filesystem(storage)
        filesystem.delete_dir(f"{root}/{MARKER_DIR}")
    except OSError:
        pass


def check_cluster_paths(storage: str, data_path: Optional[str] = None,
                        node_view: Callable[[str, str], str] = lambda path, node_id: path) -> None:
    """Before any trial: from a task pinned to each live node, write a marker into `storage` (and look for the
    data directory); the driver then reads every marker back. A node whose marker the driver cannot read (a
    local path on a multi-node cluster) or that cannot see the data is one `ConfigError` naming the nodes.

    `node_view(path, node_id)`: the path as that node names it (the identity; tests simulate a node-local
    directory with it). Leaves nothing behind: the markers are removed."""
    import pyarrow as pa
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def on(node_id: str, task: Callable):
        return ray.remote(num_cpus=0)(task).options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, False))

    nodes, check = alive_nodes(), uuid.uuid4().hex[:8]
    ids = [node["NodeID"] for node in nodes]
    results = dict(zip(ids, ray.get([on(i, _write_marker).remote(
        node_view(storage, i), f"{check}-{i}", f"{check}:{i}", node_view(data_path, i) if data_path else None)
        for i in ids])))
    filesystem, root = storage_filesystem(storage)
    unseen, blind = [], []
    for node in nodes:
        node_id, where = node["NodeID"], f"{node['NodeID'][:12]} ({node['NodeManagerAddress']})"
        try:
            with filesystem.open_input_stream(f"{root}/{MARKER_DIR}/{check}-{node_id}") as stream:
                ok = stream.read().decode() == f"{check}:{node_id}"
        except (OSError, pa.ArrowException):
            ok = False
        if not ok:
            error = results[node_id]["storage_error"]
            unseen.append(where + (f": {error}" if error else ""))
        if not results[node_id]["data_visible"]:
            blind.append(where)
    ray.get([on(i, _remove_markers).remote(node_view(storage, i)) for i in ids])
    problems = []
    if unseen:
        problems.append(f"--storage {storage}: what these nodes write there does not reach the driver: "
                        f"{', '.join(unseen)}. On a cluster of {len(nodes)} nodes the storage must be shared — "
                        "s3://…, gs://… or a mount every node has (NFS)")
    if blind:
        problems.append(f"--data {data_path}: not visible on {', '.join(blind)}; put the data on a mount every "
                        "node has")
    if problems:
        raise ConfigError("\n".join(problems))


# -- a cluster of several nodes on this machine ------------------------------------------------------------------

LOOPBACK = "127.0.0.2"  # Ray 2.60 rewrites 127.0.0.1 and localhost to the machine's network address; 127.0.0.2
# is loopback too (all of 127/8 is) and Ray keeps it, so the cluster's traffic stays on this machine


class LocalCluster:
    """A head and `nodes − 1` worker nodes on this machine, each `ray start --block` with its own raylet, CPUs,
    temp dir (`temp_root`) and process group, all on the loopback address, with a token of their own
    (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in `env`: nothing is written to ~/.ray). `stop()` ends exactly the
    processes it started — never a machine-wide `ray stop`, which would end every other Ray here."""

    def __init__(self, directory: str | Path, nodes: int = 2, cpus_per_node: int = 1, extra_env: dict | None = None,
                 node_env: dict[str, dict] | None = None):
        self.directory, self.nodes, self.cpus = Path(directory).resolve(), nodes, cpus_per_node
        self.node_env = node_env or {}  # by node name (head, worker1, …): what differs between machines (caches)
        self.env = {**os.environ, **(extra_env or {}), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.processes: list[subprocess.Popen] = []
        self.names: list[str] = []  # of the nodes started, each with a log of its own
        self.address: Optional[str] = None
        # Ray's sockets live in each node's temp dir, and a socket path may not exceed 107 bytes: a short one
        self.temp_root = Path(tempfile.mkdtemp(prefix="txray-", dir="/tmp" if Path("/tmp").is_dir() else None))

    def _start_node(self, name: str, *args: str, cpus: Optional[int] = None) -> None:
        temp = self.temp_root / name
        ray = str(Path(sys.executable).with_name("ray"))
        log = open(self.directory / f"{name}.log", "w")
        self.names.append(name)
        env = {**self.env, **self.node_env.get(name, {})}
        self.processes.append(subprocess.Popen(
            [ray, "start", "--block", "--node-ip-address", LOOPBACK, "--num-cpus", str(cpus or self.cpus),
             "--num-gpus", "0", "--temp-dir", str(temp), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))  # its own process group: stop() signals the group, and only it

    def start(self, timeout: float = 120.0) -> str:
        """Start the nodes and wait until all have joined; returns the cluster address (`--address`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._start_node("head", "--head", "--port", "0", "--dashboard-host", LOOPBACK, "--dashboard-port", "0")
        address_file = self.temp_root / "head" / "ray_current_cluster"
        deadline = time.monotonic() + timeout
        while not (address_file.is_file() and address_file.read_text().strip()):
            self._check_alive(deadline, "head")
            time.sleep(0.5)
        self.address = address_file.read_text().strip()
        for i in range(1, self.nodes):
            self._start_node(f"worker{i}", "--address", self.address)
        self._wait_joined(deadline)
        return self.address

    def add_node(self, cpus: Optional[int] = None, timeout: float = 120.0) -> None:
        """One more worker node (`cpus`, default the cluster's per-node count), once the cluster runs: a cluster
        that grows while a search runs, as an autoscaler grows one."""
        self._start_node(f"worker{len(self.names)}", "--address", self.address, cpus=cpus)
        self._wait_joined(time.monotonic() + timeout)

    def _wait_joined(self, deadline: float) -> None:
        """Until every node's `ray start` reported the runtime started (a worker only after it joined the head)."""
        while not all("Ray runtime started" in (self.directory / f"{name}.log").read_text() for name in self.names):
            self._check_alive(deadline, "nodes")
            time.sleep(1.0)

    def _check_alive(self, deadline: float, what: str) -> None:
        dead = [p.args[1:3] for p in self.processes if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"local Ray cluster: {what} did not start (logs in {self.directory})")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM each node's process group, then SIGKILL what is left after `grace` seconds (a `ray start
        --block` node does not always end its GCS on SIGTERM)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in reversed(self.processes):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while (sig == signal.SIGTERM and time.monotonic() < deadline
                   and any(_group_alive(p.pid) for p in self.processes)):
                time.sleep(0.2)
        for p in self.processes:
            p.wait()
        self.processes.clear()
        shutil.rmtree(self.temp_root, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@contextmanager
def local_cluster(directory: str | Path, nodes: int = 2, cpus_per_node: int = 1, extra_env: dict | None = None,
                  node_env: dict[str, dict] | None = None) -> Iterator[LocalCluster]:
    cluster = LocalCluster(directory, nodes, cpus_per_node, extra_env, node_env)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


# -- the services a cluster's search uses, on this machine -------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServices:
    """What the deploy files give a cluster's search, as real processes on this machine: PostgreSQL (the server
    binaries of the `pgserver` wheel) for Optuna and as MLflow's backend store, an `mlflow server` that serves
    artifacts (kept in S3 when `s3`, else in its directory), and S3-compatible object storage (moto's server) for
    `--storage s3://…`. For tests, benchmarks and `scripts/local_cluster.py --services`; `stop()` ends exactly what
    it started. Needs the `cluster` extra (and moto, a `dev` dependency, for S3).

    `postgres_url(database, user, password)`: a URL on its socket (a password in it is what a deployment's has: the
    local socket accepts any); `mlflow_url`; `s3_env`: the variables boto3, pyarrow and MLflow read (AWS_ENDPOINT_URL
    and test credentials); `bucket`."""

    def __init__(self, directory: str | Path, s3: bool = True, bucket: str = "tune-xray"):
        self.directory, self.s3, self.bucket = Path(directory).resolve(), s3, bucket
        self.processes: list[subprocess.Popen] = []
        self.postgres = None
        self.mlflow_url = ""
        self.s3_env: dict[str, str] = {}

    def __enter__(self) -> LocalServices:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def postgres_url(self, database: str = "postgres", user: str = "tune", password: str = "tune") -> str:
        socket_dir = self.postgres.get_uri().split("host=", 1)[1]
        return f"postgresql://{user}:{password}@/{database}?host={socket_dir}"

    def start(self, timeout: float = 120.0) -> LocalServices:
        import pgserver

        self.directory.mkdir(parents=True, exist_ok=True)
        self.postgres = pgserver.get_server(self.directory / "postgres", cleanup_mode="stop")
        self.postgres.psql("CREATE ROLE tune LOGIN SUPERUSER PASSWORD 'tune';")  # a deployment's kind of user
        for database in ("optuna", "mlflow"):
            self.postgres.psql(f"CREATE DATABASE {database} OWNER tune;")
        env = dict(os.environ)
        if self.s3:
            port = _free_port()
            self._spawn("s3", [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                        env)
            self.s3_env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "MLFLOW_S3_ENDPOINT_URL":
                           f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
            self._wait(f"http://127.0.0.1:{port}/", timeout, "S3 (moto)")
            import boto3

            boto3.client("s3", endpoint_url=self.s3_env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                         aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=self.bucket)
            env.update(self.s3_env)
        port = _free_port()
        artifacts = f"s3://{self.bucket}/mlartifacts" if self.s3 else (self.directory / "mlartifacts").as_uri()
        self._spawn("mlflow", [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                               self.postgres_url("mlflow"), "--artifacts-destination", artifacts, "--serve-artifacts",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env)
        self.mlflow_url = f"http://127.0.0.1:{port}"
        self._wait(f"{self.mlflow_url}/health", timeout, "the MLflow server")
        return self

    def _spawn(self, name: str, command: list[str], env: dict) -> None:
        log = open(self.directory / f"{name}.log", "w")
        self.processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def _wait(self, url: str, timeout: float, what: str) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                self.stop()
                raise RuntimeError(f"{what} did not start (logs in {self.directory})")
            time.sleep(0.5)

    def stop(self) -> None:
        for p in self.processes:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.processes.clear()
        if self.postgres is not None:
            self.postgres.cleanup()
            self.postgres = None
