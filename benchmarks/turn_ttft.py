"""A cached session turn's time to first token on the engine alone (no Ray, no HTTP), with the
host mirror's prefix loads as one 2-D copy per run of blocks (now) and as one copy per block
(before issue 15, ``--per-block``): SmolLM2-135M's shape with random weights, bf16, the served
defaults' policy (lsa) and a page-locked arena of a node store, as a decode worker has them.

    python -m benchmarks.turn_ttft [--context 6000] [--block-size 16] [--turns 5] [--per-block]

Per turn (a 16-token question, one token out): the time from ``SessionManager.start`` to the
step that sampled its first token, median over the turns after the first.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from actors.kv_store import KVStoreCore, arena_path
    from benchmarks.make_random_model import SHAPES
    from engine.config import CacheConfig, EngineConfig, ModelConfig, PolicyConfig, SchedulerConfig
    from engine.host_arena import ArenaLayout, HostArena
    from engine.llm import LLMEngine
    from engine.loader import random_model
    from engine.sampling import SamplingParams
    from engine.sessions import SessionManager

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=6000)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--per-block", action="store_true", help="load the prefix one copy per block (as before)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.per_block:
        import engine.host_mirror as host_mirror

        runs = host_mirror.gather_rows

        def per_block(dense, table, rows):  # one layer of each block (fetch_layer) as before; whole rows as they were
            if table.stride(0) == table[0].numel():
                return runs(dense, table, rows)
            for i, r in enumerate(rows):
                dense[i].copy_(table[r], non_blocking=True)

        host_mirror.gather_rows = per_block
    shape = SHAPES["smollm2-135m"]
    mc = ModelConfig("llama", 49152, shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
                     shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"],
                     rope_theta=shape["rope_theta"], max_position_embeddings=shape["max_position_embeddings"],
                     tie_word_embeddings=True)
    config = EngineConfig(device=device, cache=CacheConfig(block_size=args.block_size),
                          scheduler=SchedulerConfig(), policy=PolicyConfig("lsa"))
    model = random_model(mc, device, torch.bfloat16 if device == "cuda" else torch.float32, seed=0)
    dtype = next(model.parameters()).dtype
    layout = ArenaLayout.of(mc, args.block_size, dtype)
    blocks = 4 * (args.context // args.block_size + 64)
    shm = tempfile.mkdtemp(dir="/dev/shm")
    store = KVStoreCore("bench", layout, blocks * layout.block_bytes, arena_path("bench", "turn", shm))
    try:
        arena = HostArena.from_file(store.path, layout, store.num_blocks, pin=device == "cuda")
        engine = LLMEngine(model, config, arena=arena)
        sessions = SessionManager(engine, arena.allocator, 16, arena.num_blocks)
        gen = torch.Generator().manual_seed(0)

        def run(turn) -> tuple[object, float]:
            turn.leased = store.lease("bench", turn.to_lease) if turn.to_lease else []
            t0 = time.perf_counter()
            sessions.start(turn)
            first = None
            while True:
                done = sessions.step()
                if first is None and turn.seq.output_ids:
                    first = time.perf_counter() - t0
                if done:
                    return done[0], first

        context = torch.randint(4, mc.vocab_size, (args.context,), generator=gen).tolist()
        created, seconds = run(sessions.admit_create("s", context))
        store.put("bench", "s", created.context_ids, created.created)
        print(f"session of {args.context} tokens prefilled in {seconds:.2f} s ({device})", flush=True)
        ttfts = []
        for i in range(args.turns):
            view = store.pin("s")
            question = torch.randint(4, mc.vocab_size, (16,), generator=gen).tolist()
            turn = sessions.admit_ask("s", view.context_ids, view.host_ids, question,
                                      SamplingParams(max_tokens=1, ignore_eos=True))
            _, first = run(turn)
            store.unpin("s")
            ttfts.append(first)
            print(f"turn {i + 1}: first token after {first * 1e3:.1f} ms ({turn.prefill_tokens} prefilled)", flush=True)
        later = ttfts[1:] or ttfts
        print(f"{'per block' if args.per_block else '2-D runs'}: median TTFT of turns 2..{args.turns} "
              f"{statistics.median(later) * 1e3:.1f} ms", flush=True)
    finally:
        store.close()
        shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
