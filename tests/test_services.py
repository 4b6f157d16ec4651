"""A search among other things on one machine, and against the services the deploy files name, all real processes
started here: which Ray a search joins (its own unless told, never another search's), what happens when that Ray
dies, and a search on a two-node cluster with Optuna on PostgreSQL, MLflow on an `mlflow server` and its storage on
S3-compatible object storage — killed, resumed from another directory, registered, predicted — that writes no
password anywhere."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.test_cluster import SPACE
from tune_xray.cluster import LocalServices, RayUnreachable, connect, local_cluster, which_ray

SEARCH = [sys.executable, "-m", "tune_xray.search"]


def _search(tmp_path: Path, name: str, *flags: str, trials: int = 2, env: dict | None = None,
            log: str | None = None) -> subprocess.Popen:
    """A search of `trials` tiny trials in a process of its own; its console in `log` (default NAME.log)."""
    space = tmp_path / f"{name}.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "budget": {**SPACE["budget"], "trials": trials}}))
    out = open(tmp_path / (log or f"{name}.log"), "w")
    return subprocess.Popen([*SEARCH, str(space), "--name", name, "--no-report", *flags], cwd=tmp_path,
                            env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(process: subprocess.Popen, log: Path, text: str, limit: float = 300) -> None:
    """Until `text` is in the search's console (its first trial's line, say)."""
    deadline = time.monotonic() + limit
    while text not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def test_a_search_joins_only_the_ray_it_is_told_and_a_dead_one_is_one_line(tmp_path, monkeypatch):
    """No address: a Ray of its own, whatever other Ray processes run here (Ray's legacy `auto` would join them).
    A named address nothing answers: one line within seconds, not "Failed to connect to GCS" every 5 s; a `ray
    start` record left by a crashed cluster: passed over for a Ray of its own."""
    import shutil
    import tempfile

    import ray

    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    assert which_ray() == (None, "")
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.2:1")  # a crashed `ray start`'s record
    assert which_ray() == ("127.0.0.2:1", "the `ray start` cluster here")
    started = time.monotonic()
    with pytest.raises(RayUnreachable, match=r"--address 127.0.0.2:2: no Ray answers there"):
        connect("127.0.0.2:2")
    assert time.monotonic() - started < 30
    try:
        assert connect() == "a Ray of its own (the `ray start` record names 127.0.0.2:1, which does not answer)"
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(SPACE))
    out = subprocess.run([*SEARCH, "tiny.yaml", "--address", "auto"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "RAY_TMPDIR": str(tmp_path / "none")})
    assert out.returncode == 2 and "--address auto: no cluster was started here with `ray start`" in out.stderr
    assert not (tmp_path / "tune_xray_runs").exists()  # before anything was written


def test_two_searches_on_one_machine_each_run_on_a_ray_of_their_own(tmp_path):
    """Started one after the other, the first ending while the second runs: each on its own Ray, both complete
    every trial (a search that had joined the first's Ray died with it)."""
    first = _search(tmp_path, "first", "--no-ensemble", trials=2)
    _wait_for(first, tmp_path / "first.log", "one line per trial")
    second = _search(tmp_path, "second", "--no-ensemble", trials=4)
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert second.poll() is None  # still running when the first's Ray went away
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    for name, trials in (("first", 2), ("second", 4)):
        said = (tmp_path / f"{name}.log").read_text()
        assert f"{name}: complete — {trials} of {trials} trials" in said and "on a Ray of its own;" in said


def test_a_search_whose_ray_dies_ends_resumable_within_a_minute(tmp_path):
    """The Ray processes under a running search killed: one line saying so, exit 1 within a minute, the lock
    released, its MLflow runs `interrupted` (KILLED, none RUNNING), and --resume completes it."""
    search = _search(tmp_path, "dies", "--no-ensemble", trials=3)
    log = tmp_path / "dies.log"
    _wait_for(search, log, ": complete, ")  # a trial ended: Tune has saved the search's state
    children = subprocess.run(["pgrep", "-P", str(search.pid), "-f", "gcs_server|raylet"], capture_output=True,
                              text=True).stdout.split()
    assert children
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    killed = time.monotonic()
    assert search.wait(timeout=120) == 1
    assert time.monotonic() - killed < 60
    said = log.read_text()
    assert "error: the Ray under the search is gone" in said and "--resume dies" in said
    client = MlflowClient(f"sqlite:///{tmp_path / 'tune_xray_runs' / 'dies' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dies").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("tune_xray.role") == "search")
    assert parent.info.status == "KILLED" and parent.data.tags["tune_xray.status"] == "interrupted"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    resumed = _search(tmp_path, "dies", "--resume", "--no-ensemble", trials=3, log="resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "dies: complete — 3 of 3 trials" in (tmp_path / "resumed.log").read_text()


def test_the_deploy_files_services_for_real(tmp_path):
    """A search on a two-node loopback cluster with Optuna on PostgreSQL, MLflow on an `mlflow server` (its backend
    on PostgreSQL, its artifacts in S3) and `--storage s3://…` (moto's server, AWS_ENDPOINT_URL): its driver killed
    mid-search, resumed from another local directory as on a second machine — the password given again, on its
    command line — it ends with the ensemble registered on the server, which `predict models:/…` loads from there.
    The password is nowhere: not in the experiment's files on either machine, in the bucket, or in MLflow's
    database."""
    import boto3

    secret = "s3/cr3t pw'4711"  # a slash, a blank and a quote: what SQLAlchemy takes unencoded, and a pattern did not
    token = "tok3n-0815"  # the MLflow server's, as a user of its URL (it takes any; requests sends it as basic auth)
    with LocalServices(tmp_path / "services") as services, \
            local_cluster(tmp_path / "cluster", nodes=2, cpus_per_node=1, extra_env=services.s3_env) as cluster:
        optuna_url = services.postgres_url("optuna", "tune", secret)
        tracking_uri = services.mlflow_url.replace("http://", f"http://{token}@")
        flags = ["--address", cluster.address, "--storage", f"s3://{services.bucket}/runs", "--optuna-storage",
                 optuna_url, "--tracking-uri", tracking_uri, "--ensemble-size", "2"]
        env = {**cluster.env, **services.s3_env}
        first = _search(tmp_path, "svc", *flags, "--local-dir", str(tmp_path / "machine1"), trials=3, env=env)
        _wait_for(first, tmp_path / "svc.log", "svc: ")  # the trials started
        _wait_for(first, tmp_path / "svc.log", ": complete, ")  # one ended
        os.killpg(first.pid, signal.SIGKILL)  # the driver's machine is gone
        first.wait()
        resumed = _search(tmp_path, "svc", *flags, "--resume", "--local-dir", str(tmp_path / "machine2"), trials=3,
                          env=env, log="resumed.log")
        assert resumed.wait(timeout=900) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
        said = (tmp_path / "resumed.log").read_text()
        assert "svc: complete — 3 of 3 trials" in said and "registered as models:/svc/1" in said
        assert "View run" not in said  # MLflow's own pair of lines per run ended on a server: the search says one
        predicted = subprocess.run([sys.executable, "-m", "tune_xray.predict", "models:/svc/1",
                                    str(next((tmp_path / "machine2").rglob("*.png"), None) or _an_image(tmp_path)),
                                    "--tracking-uri", tracking_uri], capture_output=True, text=True, env=env)
        assert predicted.returncode == 0 and predicted.stdout.startswith("path,p_"), predicted.stderr[-2000:]
        # nowhere written down or shown: the consoles, the experiment's files here and there, the bucket, MLflow's and
        # Optuna's databases; each secret as given and percent-encoded
        hidden = [s.encode() for word in (secret, token) for s in {word, quote(word), quote(word, safe="")}]
        assert not [s for s in hidden if s in (predicted.stdout + predicted.stderr).encode()]
        for log in tmp_path.glob("*.log"):
            assert not [s for s in hidden if s in log.read_bytes()], log
        for machine in ("machine1", "machine2"):
            for path in (tmp_path / machine).rglob("*"):
                assert not path.is_file() or not [s for s in hidden if s in path.read_bytes()], path
        s3 = boto3.client("s3", endpoint_url=services.s3_env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=services.bucket)
                for o in page.get("Contents", [])]
        assert any(k.startswith("runs/svc/") for k in keys) and any(k.startswith("mlartifacts/") for k in keys)
        for key in keys:
            body = s3.get_object(Bucket=services.bucket, Key=key)["Body"].read()
            assert not [s for s in hidden if s in body], key
        for database in ("mlflow", "optuna"):
            rows = _every_row(services.postgres_url(database)).encode()
            assert not [s for s in hidden if s in rows], database


def _every_row(url: str) -> str:
    """Every row of every table of a database, as text."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    with engine.connect() as connection:
        return "\n".join(str(row) for table in sqlalchemy.inspect(engine).get_table_names()
                         for row in connection.execute(sqlalchemy.text(f'SELECT * FROM "{table}"')))


def _an_image(tmp_path: Path) -> Path:
    from tune_xray.data.synthetic import generate

    return next((generate(tmp_path / "images", n_images=10, size=64, seed=1) / "images").glob("*.png"))
