"""Issue 15: a cached session turn served (cluster:app, one worker) vs the engine alone (a
DecodeWorkerCore over an in-process KVStoreCore), with the answer's per-phase ``timings``.
    PYTHONPATH=. python docs/results/issue15/probe_turn.py   (CTX, TURNS, MAXT, MODEL, SIDE from the environment)"""
import json, os, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch
from benchmarks.serve import Workload, EngineAlone
from cluster.local import local_app, free_port

CTX = int(os.environ.get("CTX", 2048)); TURNS = int(os.environ.get("TURNS", 6)); MAXT = int(os.environ.get("MAXT", 2))
args = {"model": os.environ.get("MODEL", "smollm2-135m"), "num_workers": 1, "torch_threads": 1}
w = Workload([CTX], TURNS, CTX, 0, MAXT, vocab=(4, 32000))
side = os.environ.get("SIDE", "both")

def show(label, rows):
    keys = sorted({k for r in rows for k in r})
    print(label, {k: round(statistics.median([r.get(k, 0) for r in rows[1:]]) * 1e3, 1) for k in keys}, flush=True)

if side in ("both", "served"):
    from cluster.client import LSAClient
    with local_app(args, num_cpus=2, port=free_port()) as url:
        client = LSAClient(url, timeout_s=3600)
        sid = client.create_session(w.context(CTX))["id"]
        rows = []
        for i in range(TURNS):
            t0 = time.perf_counter(); first = None; final = None
            for ev in client.stream(f"/v1/sessions/{sid}/ask", {"question": w.question(i), "max_tokens": MAXT, "ignore_eos": True}):
                if first is None and ev.get("text"):
                    first = time.perf_counter() - t0
                if "num_tokens" in ev:
                    final = ev
            total = time.perf_counter() - t0
            t = final["timings"]
            row = {"ttft": first, "total": total, **t}
            row["transport_to_first"] = first - t["ingress"] - t["admission"] - t["queued"] - t["first_token"]
            rows.append(row); print("served", {k: round(v * 1e3, 1) for k, v in row.items()}, flush=True)
        show("served median ms", rows)
if side in ("both", "engine"):
    from actors.config import ServeConfig
    from engine.options import build
    cfg = build(ServeConfig, args)
    import tempfile
    eng = EngineAlone(cfg, tempfile.mkdtemp(dir="/dev/shm"))
    sid, _ = eng.create(w.context(CTX))
    from engine.sampling import SamplingParams
    rows = []
    for i in range(TURNS):
        t0 = time.perf_counter(); first = []
        fut = eng.core.ask(sid, w.question(i), SamplingParams(max_tokens=MAXT, ignore_eos=True),
                           on_text=lambda text, done: first or done or first.append(time.perf_counter() - t0))
        res = fut.result(); total = time.perf_counter() - t0
        row = {"ttft": first[0] if first else total, "total": total, **res.timings}
        rows.append(row); print("engine", {k: round(v * 1e3, 1) for k, v in row.items()}, flush=True)
    show("engine median ms", rows)
    eng.close()
