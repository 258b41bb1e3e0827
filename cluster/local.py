"""A local Ray cluster with ``cluster:app`` on it, started and stopped cleanly (``lsa serve``,
``lsa cluster-demo``). Ray's files go to a short temp directory of our own (unix socket
paths are limited to ~107 characters), removed on exit; SIGTERM stops it like Ctrl-C. A taken
port is an error before Ray starts."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from engine.errors import InvalidRequestError

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Raise ``InvalidRequestError`` when nothing could listen on ``host:port`` (taken, or a
    bad address). Binds as the HTTP server would (``SO_REUSEADDR``), then lets go."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise InvalidRequestError(f"port {port} on {host} is taken: stop what listens there, or pick "
                                          f"another with --port") from None
            raise InvalidRequestError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): give another "
                                      f"--host or --port") from None


@contextmanager
def local_app(app_args: dict, num_cpus: int | None = None, port: int = 8000, host: str = "127.0.0.1",
              namespace: str = "lsa"):
    """Start Ray and ``cluster:app``; yields the base URL; tears everything down after."""
    check_port_free(host, port)
    import ray
    from ray import serve

    tmp = tempfile.mkdtemp(prefix="lsa", dir="/tmp")
    saved = dict(os.environ)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")

    # Ray's driver installs a C-level SIGTERM handler in ray.init that aborts the process (no
    # cleanup: the arena, this temp folder and Ray's processes stayed behind): ours goes in after.
    stop_on_term = signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.setdefault("LSA_KV_DIR", tmp if not os.path.isdir("/dev/shm") else "/dev/shm")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([saved["PYTHONPATH"]] if saved.get("PYTHONPATH")
                                                               else []))
    app_args = {"cluster": f"local{os.getpid()}", **app_args}
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, namespace=namespace,
                 configure_logging=False)
        if stop_on_term:
            signal.signal(signal.SIGTERM, on_term)
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
            for folder in {os.environ.get("LSA_KV_DIR", tmp), app_args.get("kv_dir") or tmp}:  # where stores made arenas
                for f in Path(folder).glob(f"lsa-kv-{app_args['cluster']}-*.arena"):
                    f.unlink(missing_ok=True)
            os.environ.clear()
            os.environ.update(saved)
            signal.signal(signal.SIGTERM, previous)
            shutil.rmtree(tmp, ignore_errors=True)
