"""Run a command against a Ray cluster of several nodes on this machine, then stop that cluster (and only it).

Each node is its own `ray start` raylet with its own CPUs, on loopback, with a token of its own; `{address}` in
the command becomes the cluster's address. Try a multi-node search before renting a cluster:

    python scripts/local_cluster.py --nodes 2 --cpus-per-node 1 -- \
        python -m tune_xray.search byol --smoke --address {address}

Exits with the command's exit code. Trials record the node they trained on (summary.json `node_id`, the MLflow
tag `tune_xray.node_id`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from tune_xray.cluster import local_cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--logs", help="where the nodes' `ray start` logs go (default: a temporary directory)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command; {address} is replaced")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: pass -- python -m tune_xray.search ... --address {address}")
    start = time.perf_counter()
    with local_cluster(args.logs or tempfile.mkdtemp(prefix="tune_xray-cluster-"), args.nodes,
                       args.cpus_per_node) as cluster:
        print(f"{args.nodes} nodes up at {cluster.address} in {time.perf_counter() - start:.1f} s", flush=True)
        ran = time.perf_counter()
        code = subprocess.run([part.replace("{address}", cluster.address) for part in command],
                              env=cluster.env).returncode
        print(f"command: exit {code} after {time.perf_counter() - ran:.1f} s; stopping the cluster", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
