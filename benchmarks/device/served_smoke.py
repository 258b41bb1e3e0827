"""A served smoke run against a running app (any model): sessions, turns, OpenAI completions,
streaming; times each call and scrapes /metrics. ``python served_smoke.py URL OUT.json``."""
from __future__ import annotations

import json
import sys
import time
import urllib.request

from cluster.client import LSAClient

TEXT = ("The ferry to the island leaves from the north pier every morning at seven. " * 20
        + "The keeper of the lighthouse is called Ines and she keeps a grey cat. " * 2
        + "Merchants in the harbour sell salted fish, lemons and rope. " * 20)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main(url: str, out_path: str) -> int:
    client = LSAClient(url, timeout_s=300)
    report: dict = {"url": url, "calls": []}
    for round_ in range(2):
        session, t_create = timed(client.create_session, TEXT)
        entry = {"round": round_, "create_s": t_create, "num_tokens": session["num_tokens"],
                 "prefill_tokens": session["prefill_tokens"], "asks": []}
        for question in ("Who keeps the lighthouse?", "When does the ferry leave?", "What do merchants sell?"):
            answer, t_ask = timed(client.ask, session["id"], question, max_tokens=24)
            entry["asks"].append({"s": t_ask, "prefill_tokens": answer.prefill_tokens, "text": answer.text[:80]})
        client.delete_session(session["id"])
        report["calls"].append(entry)
    plain, t_plain = timed(client.generate, TEXT[:2000], max_tokens=32)
    t0 = time.perf_counter()
    arrivals = []
    for _ in client.generate(TEXT[:2000], max_tokens=32, stream=True):
        arrivals.append(time.perf_counter() - t0)
    report["completion_s"] = t_plain
    report["stream_first_s"] = arrivals[0] if arrivals else None
    report["stream_events"] = len(arrivals)
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        report["metrics"] = [line for line in resp.read().decode().splitlines() if line and not line[0] == "#"]
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    for c in report["calls"]:
        print(f"round {c['round']}: session of {c['num_tokens']} tokens created in {c['create_s']:.2f} s; asks "
              + ", ".join(f"{a['s']:.2f} s ({a['prefill_tokens']} prefilled)" for a in c["asks"]))
    print(f"completion {t_plain:.2f} s; stream: first event {report['stream_first_s']}, {len(arrivals)} events")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
