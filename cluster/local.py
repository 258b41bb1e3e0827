"""A local Ray cluster with ``cluster:app`` on it, started and stopped cleanly (``lsa serve``,
``lsa cluster-demo``). Ray's files go to a short temp directory of our own (unix socket
paths are limited to ~107 characters), removed on exit; SIGTERM stops it like Ctrl-C."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_app(app_args: dict, num_cpus: int | None = None, port: int = 8000, host: str = "127.0.0.1",
              namespace: str = "lsa"):
    """Start Ray and ``cluster:app``; yields the base URL; tears everything down after."""
    import ray
    from ray import serve

    tmp = tempfile.mkdtemp(prefix="lsa", dir="/tmp")
    saved = dict(os.environ)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, on_term)
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.setdefault("LSA_KV_DIR", tmp if not os.path.isdir("/dev/shm") else "/dev/shm")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([saved["PYTHONPATH"]] if saved.get("PYTHONPATH")
                                                               else []))
    app_args = {"cluster": f"local{os.getpid()}", **app_args}
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, namespace=namespace,
                 configure_logging=False)
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        from cluster.serve_app import app

        serve.run(app(app_args), name="lsa", route_prefix="/")
        yield f"http://{host}:{port}"
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                for actor in ray.util.list_named_actors(all_namespaces=True):
                    if actor["name"].startswith(("kvstore:", "lsa-indexer", "lsa-sessions")):
                        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
                ray.shutdown()
        finally:
            for f in Path(os.environ.get("LSA_KV_DIR", tmp)).glob(f"lsa-kv-{app_args['cluster']}-*.arena"):
                f.unlink(missing_ok=True)
            os.environ.clear()
            os.environ.update(saved)
            signal.signal(signal.SIGTERM, previous)
            shutil.rmtree(tmp, ignore_errors=True)
