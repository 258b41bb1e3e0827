"""Cross-node staging throughput of the KV stores, on CPU: two Ray nodes on this machine.

    python benchmarks/pooled_staging.py OUT.json [--blocks 256] [--shape llama8b-fp8|smollm2] [--rounds 2]

Two ``KVStore`` actors (one per node of a ``ray.cluster_utils.Cluster``), as served. A session of
``--blocks`` blocks of random KV is put in node A's store, all but its sink block spilled to
node B's store (``spill_session``), then staged back (``stage``, what a turn on a spilled session
waits for) and checked byte for byte. Reported per round: spill and stage seconds and GB/s, and,
to say where the time goes, the pieces of one stage done by hand from the driver: the peer's
``read_runs`` of the batches (serialised into its object store), their pull to the driver's node
and deserialisation, and the ``write`` into an arena; last, Ray's own pull of the same bytes of
plain numpy between the two nodes (the ceiling a stage can reach here).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # (layers, KV heads, head dim, block size, dtype, host dtype)
    "llama8b-fp8": (32, 8, 128, 64, "bfloat16", "fp8"),
    "smollm2": (30, 3, 64, 64, "bfloat16", None),
}


def run(args) -> dict:
    import ray
    import torch
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.kv_store_actor import KVStore
    from actors.session_store import batch_blocks, num_rows, store_name
    from engine.host_arena import ArenaLayout

    layout = ArenaLayout(*SHAPES[args.shape])
    capacity = (args.blocks + 8) * layout.block_bytes
    gb = args.blocks * layout.block_bytes / 1e9
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    saved = dict(os.environ)
    os.environ.update(RAY_TMPDIR=tmp, HOME=tmp, LSA_KV_DIR="/dev/shm")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([saved["PYTHONPATH"]] if saved.get("PYTHONPATH") else []))
    store_mem = int(max(2 * gb, 1.0) * 1e9) + (256 << 20)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                      "object_store_memory": store_mem})
    c.add_node(num_cpus=2, resources={"kv_only": 1}, object_store_memory=store_mem)
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="pooled-staging", log_to_driver=False)
    out: dict = {"shape": args.shape, "block_bytes": layout.block_bytes, "blocks": args.blocks, "gb": gb,
                 "rounds": []}
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        head = ray.get_runtime_context().get_node_id()
        peer = next(n for n in nodes if n != head)
        stores = {}
        for node in (head, peer):
            stores[node] = KVStore.options(
                name=store_name(node), namespace="pooled-staging", num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                    "bench", capacity, layout, "/dev/shm")
        a, b = stores[head], stores[peer]
        ray.get([s.ping.remote() for s in stores.values()])
        from engine.host_arena import HostArena

        info = ray.get(a.info.remote())
        arena = HostArena.from_file(info.path, info.layout, info.num_blocks)  # node A's arena, mapped here
        gen = torch.Generator().manual_seed(0)
        for r in range(args.rounds):
            ids = ray.get(a.lease.remote("bench", args.blocks))
            arena.host.view(torch.uint8)[ids] = torch.randint(0, 255, (len(ids),) + arena.host.shape[1:],
                                                             dtype=torch.uint8, generator=gen)
            arena.summary[ids] = torch.randn((len(ids),) + arena.summary.shape[1:], generator=gen).to(arena.summary.dtype)
            if arena.scale is not None:
                arena.scale[ids] = torch.rand((len(ids),) + arena.scale.shape[1:], generator=gen)
            want = tuple(t.clone() for t in arena.read(ids))
            session = f"s{r}"
            ray.get(a.put.remote("bench", session, list(range(args.blocks * layout.block_size)), ids))
            t0 = time.perf_counter()
            logical = ray.get(a.spill_session.remote(session, args.blocks - 1, peer))
            spill_s = time.perf_counter() - t0
            moved_gb = len(logical) * layout.block_bytes / 1e9
            # the pieces of a stage, one after the other, by hand: the peer reads and puts the batches
            # into its object store (read_runs), they are pulled to this node, then written to an arena
            remote_ids = [rid for _, rid in ray.get(a.missing.remote(session))[peer]]
            batch = batch_blocks(layout.block_bytes)
            t0 = time.perf_counter()
            refs = [b.read_runs.remote(remote_ids[s:s + batch]) for s in range(0, len(remote_ids), batch)]
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
            read_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            rows = ray.get(refs)
            pull_s = time.perf_counter() - t0
            scratch = HostArena.private(layout, len(remote_ids))
            scratch.host.view(torch.uint8).fill_(0)  # its pages faulted in, as an arena's are
            t0 = time.perf_counter()
            for k, piece in enumerate(rows):
                scratch.write(list(range(k * batch, k * batch + num_rows(piece))), piece)
            write_s = time.perf_counter() - t0
            del rows, refs, scratch
            t0 = time.perf_counter()
            fetched = ray.get(a.stage.remote(session))
            stage_s = time.perf_counter() - t0
            view = ray.get(a.view.remote(session))
            same = all(torch.equal(x, y) for x, y in zip(arena.read(view.host_ids), want))
            ray.get(a.delete.remote(session))
            free = {n: ray.get(s.stats.remote()).free_blocks for n, s in stores.items()}
            row = {"spill_s": spill_s, "spill_gb_s": moved_gb / spill_s, "stage_s": stage_s,
                   "stage_gb_s": moved_gb / stage_s, "blocks_fetched": fetched, "same_bytes": same,
                   "by_hand": {"peer_read_and_put_s": read_s, "pull_and_deserialise_s": pull_s, "write_s": write_s},
                   "free_blocks_after_delete": free}
            out["rounds"].append(row)
            print(f"round {r}: {moved_gb:.2f} GB; spill {spill_s:.2f} s ({row['spill_gb_s']:.2f} GB/s), stage "
                  f"{stage_s:.2f} s ({row['stage_gb_s']:.2f} GB/s), same bytes {same}; by hand: peer read+put "
                  f"{read_s:.2f} s, pull+deserialise {pull_s:.2f} s, write {write_s:.2f} s", flush=True)
        out["capacity_blocks"] = info.num_blocks
        out["ray_pull"] = ray_pull(peer, len(remote_ids) * layout.block_bytes)
        print(f"Ray's own pull of plain numpy between the nodes (the ceiling): "
              f"{[round(x, 2) for x in out['ray_pull']]} GB/s", flush=True)
    finally:
        for s in stores.values():
            ray.kill(s)
        ray.shutdown()
        c.shutdown()
        for f in Path("/dev/shm").glob("lsa-kv-bench-*.arena"):
            f.unlink(missing_ok=True)
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ray_pull(node_id: str, nbytes: int, rounds: int = 2) -> list[float]:
    """GB/s of pulling ``nbytes`` of plain numpy, made on node ``node_id``, to this node in
    64 MB objects: what Ray's object manager moves between two nodes here, nothing of ours."""
    import numpy as np
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def make(n: int):
        return np.ones(n, dtype=np.uint8)

    out = []
    for _ in range(rounds):
        on_peer = make.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        refs = [on_peer.remote(64 << 20) for _ in range(max(1, nbytes // (64 << 20)))]
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        t0 = time.perf_counter()
        got = ray.get(refs)
        out.append(len(refs) * (64 << 20) / 1e9 / (time.perf_counter() - t0))
        del got, refs
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="JSON report")
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama8b-fp8")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    out = run(args)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
