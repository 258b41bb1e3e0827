"""Ray Serve smoke test for a carried site dir: ray.init, a deployment over HTTP, then shutdown.

Usage: python3 benchmarks/device/smoke_serve.py [PORT]   (exit 0 on success; prints timings)
Also fails on import errors in the Ray log folder (dashboard agent, runtime-env agent, raylet...):
a package missing from the site dir shows up only there.
"""
import glob
import json
import os
import sys
import time
import urllib.request

t0 = time.time()
import ray  # noqa: E402
from ray import serve  # noqa: E402

port = int(sys.argv[1]) if len(sys.argv) > 1 else 8123
print(f"ray {ray.__version__} imported in {time.time() - t0:.1f}s from {os.path.dirname(ray.__file__)}", flush=True)
t = time.time()
ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="smoke")
print(f"ray.init {time.time() - t:.1f}s, resources {ray.cluster_resources()}", flush=True)
serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})

from pydantic import BaseModel  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402


class Echo(BaseModel):
    text: str


@serve.deployment(num_replicas=1)
class Hello:
    async def __call__(self, request: Request):
        body = Echo(**(await request.json()))
        return JSONResponse({"echo": body.text, "pid": os.getpid()})


t = time.time()
serve.run(Hello.bind(), name="smoke", route_prefix="/")
req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=json.dumps({"text": "hi"}).encode(),
                             headers={"Content-Type": "application/json"})
reply = json.loads(urllib.request.urlopen(req, timeout=30).read())
assert reply["echo"] == "hi", reply
print(f"serve.run + first HTTP reply {time.time() - t:.1f}s: {reply}", flush=True)
logs = ray._private.worker._global_node.get_logs_dir_path()
serve.shutdown()
ray.shutdown()
bad, other = [], []
for f in sorted(glob.glob(os.path.join(logs, "*"))):
    if os.path.isfile(f):
        text = open(f, errors="replace").read()
        if "ModuleNotFoundError" in text or "ImportError" in text:  # a package the site dir lacks
            bad.append(os.path.basename(f))
            print(f"--- {f}\n" + "\n".join(text.splitlines()[-15:]))
        elif "Traceback" in text:  # e.g. a port taken by another Ray instance on the same machine
            other.append(os.path.basename(f))
if other:
    print(f"note: other tracebacks (not imports; port clashes?) in {', '.join(other)} under {logs}")
print(f"SMOKE {'OK' if not bad else 'FAILED: import errors in ' + ', '.join(bad)} in {time.time() - t0:.1f}s")
sys.exit(1 if bad else 0)
