"""``lsa serve`` stopped with SIGTERM (as ``kill``, systemd or a container runtime stop it)
leaves nothing behind: it exits by itself, its KV arena in the arena folder is gone, its
temporary folder is gone, and no Ray process of its cluster is left running. ``serve run``
(Ray's CLI) likewise leaves no arena and no Ray process. Each of these is first seen present
while it serves, so that the test can fail."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray")
from cluster.local import check_port_free, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def processes_naming(text: str) -> list[str]:
    """Command lines of this machine's processes that contain ``text`` (Ray's processes name
    their session folder, which lives in the server's temporary folder)."""
    out = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            line = Path(cmdline).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            out.append(line[:200])
    return out


def wait_for(check, timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


def serving(url: str) -> bool:
    """The application answers (the proxy's own /-/healthz answers before the app is up)."""
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def test_sigterm_leaves_no_arena_no_temp_folder_and_no_ray_process(tmp_path):
    kv = tmp_path / "kv"
    kv.mkdir()
    port = free_port()
    before = set(glob.glob("/tmp/lsa*"))
    env = {**os.environ, "LSA_KV_DIR": str(kv), "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    server = subprocess.Popen([sys.executable, "-m", "cli", "serve", "model=tiny-random", "num_workers=1",
                               f"kv_store_bytes={16 << 20}", "torch_threads=1", "--port", str(port), "--num-cpus", "2"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
        # "lsa serve: cluster:app at ..." once serve.run returned (every deployment up)
        up = wait_for(lambda: any("cluster:app at" in line for line in lines) or server.poll() is not None, 240)
        assert up and server.poll() is None, "".join(lines)[-3000:]
        assert serving(f"http://127.0.0.1:{port}")
        made = sorted(set(glob.glob("/tmp/lsa*")) - before)
        assert len(made) == 1, made  # the server's temporary folder (Ray's sockets and logs)
        arenas = list(kv.glob("lsa-kv-*.arena"))
        assert arenas, list(kv.iterdir())
        assert processes_naming(made[0]), "no Ray process names the temporary folder: the check below proves nothing"

        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        time.sleep(0.5)  # the reader thread takes the last lines
        assert server.returncode == 0 and "lsa serve: stopped" in "".join(lines), "".join(lines)[-3000:]
        assert not list(kv.glob("lsa-kv-*.arena")), list(kv.iterdir())
        assert not os.path.exists(made[0]), made[0]
        left = wait_for(lambda: not processes_naming(made[0]), 30)
        assert left, processes_naming(made[0])
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_run_sigterm_drains_and_leaves_no_arena_and_no_ray_process(tmp_path):
    """``serve run cluster:app key=value ...`` (the README's command) stopped with SIGTERM: the app's
    builder made it a Ctrl-C (Ray's own handler would abort the driver: exit 134, no drain), so
    ``serve run`` shuts Serve down gracefully and exits 0; the cluster's processes go with the
    driver (Ray's fate sharing) and each store's watcher unlinks its arena. ``serve run`` with an
    import path serves on port 8000. Ray's session logs stay under RAY_TMPDIR, as with any driver."""
    serve_cli = Path(sys.executable).with_name("serve")
    if not serve_cli.exists():
        pytest.skip("no serve command beside this python")
    port = 8000  # serve run's port for an import path (a config file can set another)
    try:
        check_port_free("127.0.0.1", port)
    except Exception as exc:  # noqa: BLE001 - taken by something else on this machine
        pytest.skip(f"port {port} is taken: {exc}")
    kv = tmp_path / "kv"
    kv.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: unix socket paths are limited
    env = {**os.environ, "LSA_KV_DIR": str(kv), "HOME": str(tmp_path), "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    server = subprocess.Popen([str(serve_cli), "run", "cluster:app", "model=tiny-random", "num_workers=1",
                               f"kv_store_bytes={16 << 20}", "torch_threads=1"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
        up = wait_for(lambda: (serving(f"http://127.0.0.1:{port}") and list(kv.glob("lsa-kv-*.arena")))
                      or server.poll() is not None, 240)
        assert up and server.poll() is None, "".join(lines)[-3000:]
        assert processes_naming(ray_tmp) and processes_naming(str(kv)), "the checks below would prove nothing"

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, "".join(lines)[-3000:]  # a graceful shutdown, not Ray's abort
        assert any("shutting down" in line for line in lines), "".join(lines)[-3000:]
        assert wait_for(lambda: not list(kv.glob("lsa-kv-*.arena")), 30), list(kv.iterdir())
        assert wait_for(lambda: not processes_naming(ray_tmp) and not processes_naming(str(kv)), 30), \
            processes_naming(ray_tmp) + processes_naming(str(kv))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
