"""Run a command against a Ray cluster of several nodes on this machine, then stop that cluster (and only it).

Each node is its own `ray start` raylet with its own CPUs, on loopback, with a token of its own; `{address}` in
the command becomes the cluster's address. Try a multi-node search before renting a cluster:

    python scripts/local_cluster.py --nodes 2 --cpus-per-node 1 -- \
        python -m tune_xray.search byol --smoke --address {address}

With `--services`, the services the deploy files name run here too (tune_xray.cluster.LocalServices; the
`cluster` and `dev` extras): PostgreSQL for Optuna and as MLflow's backend store, an `mlflow server` whose
artifacts go to S3, and S3-compatible storage (moto's server; AWS_ENDPOINT_URL and credentials set for the command
and the nodes). `{optuna}`, `{mlflow}` and `{storage}` become their URLs, and the flags to pass are printed: run
the command above with `--services` before its `--`, and `--optuna-storage {optuna} --tracking-uri {mlflow}
--storage {storage}` added to the search.

Exits with the command's exit code. Trials record the node they trained on (summary.json `node_id`, the MLflow
tag `tune_xray.node_id`).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tune_xray.cluster import LocalServices, local_cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--logs", help="where the nodes' `ray start` logs go (default: a temporary directory)")
    parser.add_argument("--services", action="store_true", help="also PostgreSQL, an MLflow server and S3 here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command; {address} is replaced")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: pass -- python -m tune_xray.search ... --address {address}")
    start, logs = time.perf_counter(), Path(args.logs or tempfile.mkdtemp(prefix="tune_xray-cluster-"))
    with contextlib.ExitStack() as stack:
        services = stack.enter_context(LocalServices(logs / "services")) if args.services else None
        env = services.s3_env if services else {}
        cluster = stack.enter_context(local_cluster(logs, args.nodes, args.cpus_per_node, extra_env=env))
        urls = {"address": cluster.address}
        if services:
            urls.update(optuna=services.postgres_url("optuna"), mlflow=services.mlflow_url,
                        storage=f"s3://{services.bucket}/runs")
            print(f"services up: --optuna-storage {urls['optuna']} --tracking-uri {urls['mlflow']} --storage "
                  f"{urls['storage']} (with {' '.join(f'{k}={v}' for k, v in env.items())})", flush=True)
        print(f"{args.nodes} nodes up at {cluster.address} in {time.perf_counter() - start:.1f} s", flush=True)
        ran = time.perf_counter()
        code = subprocess.run([part.format_map(_Keep(urls)) for part in command], env={**cluster.env, **env}).returncode
        print(f"command: exit {code} after {time.perf_counter() - ran:.1f} s; stopping the cluster", flush=True)
    return code


class _Keep(dict):
    """str.format_map with unknown {fields} left as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


if __name__ == "__main__":
    sys.exit(main())
