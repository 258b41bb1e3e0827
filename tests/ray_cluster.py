"""A throwaway Ray cluster of several nodes on this machine, for one test module.

Ray 2.60 writes an auth token under ~/.ray and sets RAY_AUTH_MODE in os.environ, so HOME and
RAY_TMPDIR point into a short temporary directory (unix sockets allow ~107 characters) and
the whole environment is restored afterwards; a head from ``Cluster`` rather than
``ray.init``'s own local cluster lets a later module start another. See docs/cluster.md.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

REPO = Path(__file__).resolve().parents[1]
LSA_ACTORS = ("kvstore:", "lsa-indexer", "lsa-sessions")


@contextlib.contextmanager
def ray_cluster(namespace: str, head_cpus: float = 1, worker_nodes: tuple[dict, ...] = (),
                extra_paths: tuple[Path, ...] = (), serve_app: bool = False, system_config: dict | None = None):
    """Yields (cluster, worker nodes). Replicas import code by name, so the repository (and
    ``extra_paths``) go on PYTHONPATH before Ray starts; ``LSA_KV_DIR`` is the temp dir.
    ``system_config``: Ray's ``_system_config`` of the head (e.g. a faster metrics report)."""
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    saved = dict(os.environ)
    os.environ.update(RAY_TMPDIR=tmp, HOME=tmp, LSA_KV_DIR=tmp)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *map(str, extra_paths)]
                                               + ([saved["PYTHONPATH"]] if saved.get("PYTHONPATH") else []))
    head = {"num_cpus": head_cpus, "include_dashboard": False,
            **({"_system_config": system_config} if system_config else {})}
    c = Cluster(initialize_head=True, head_node_args=head)
    nodes = [c.add_node(**node) for node in worker_nodes]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace=namespace, log_to_driver=False)
    try:
        yield c, nodes
    finally:
        if serve_app:
            from ray import serve

            serve.shutdown()
            for actor in ray.util.list_named_actors(all_namespaces=True):  # detached: they outlive serve
                if actor["name"].startswith(LSA_ACTORS):
                    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
        ray.shutdown()
        c.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(tmp, ignore_errors=True)
