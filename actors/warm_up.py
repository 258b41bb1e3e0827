"""A decode worker's warm-up: kernels compiled and decode graphs captured before it serves."""
from __future__ import annotations

import logging
import time

import torch

from engine.sampling import SamplingParams

log = logging.getLogger(__name__)


def warm_up(core, seed: int = 0, decode: bool = True) -> dict:
    """Warm ``core`` (a DecodeWorkerCore) up before the first user request (the replica calls
    this before it reports ready): on CUDA, plain requests of random tokens, first one whose
    prompt takes two prefill segments and whose decode crosses an LSA cycle boundary (Level-1
    scoring), then 2, 4, 8, ... at once up to ``max_num_seqs``, then the graphs of the batch
    buckets still missing (16, 24, 32, ...: engine/graphs.py), so that none is captured while
    serving (``decode=False``, a prefill worker: the long prompt only, one token). Elsewhere
    one tiny request. Returns what ran."""
    engine = core.engine
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    short = 2 * engine.cache.block_size + 3
    scheduler = engine.config.scheduler
    if engine.device.type == "cuda":
        long = min(2 * scheduler.prefill_chunk, engine.max_model_len // 2)
        cycle = getattr(engine.config.policy, "cycle", 1)
        batches = [(1, long, cycle + 2)] + [(b, short, b + 4) for b in (2, 4, 8, 16, 32, 64)
                                             if b <= scheduler.max_num_seqs] if decode else [(1, long, 1)]
    else:
        batches = [(1, short, 2)]
    for count, length, max_tokens in batches:
        params = SamplingParams(max_tokens=min(max_tokens, engine.max_model_len - length), ignore_eos=True)
        futures = [core.generate(torch.randint(vocab, (length,), generator=gen).tolist(), params)
                   for _ in range(count)]
        for future in futures:
            future.result()
    graphs = engine.runner.graphs
    if graphs is not None and decode:
        core.on_loop(lambda: graphs.capture_batches(scheduler.max_num_seqs)).result()
    core.host_copy = core.on_loop(lambda: probe_host_copies(core)).result()
    return {"seconds": time.perf_counter() - t0, "requests": sum(b[0] for b in batches),
            "graphs": graphs.captures if graphs is not None else 0, "host_copy_gbps": core.host_copy}


SLOW_ARENA = 0.6  # an arena copying below this fraction of page-locked private memory's speed is warned of


def probe_host_copies(core) -> dict[str, float]:
    """(On the loop thread) GB/s from the worker's host arena to its GPU (engine/host_copy.py's
    ``copy_probe``); warns, in the worker's warnings (/health), when the arena copies well below
    page-locked memory of the worker's own. Empty off CUDA or without a page-locked mirror."""
    from engine.host_copy import copy_probe

    mirror = getattr(core.engine.cache, "mirror", None)
    if mirror is None or not mirror.pinned:
        return {}
    try:
        gbps = copy_probe(mirror.host, core.engine.device)
    except Exception as exc:  # a diagnostic: the worker serves without it
        log.warning("the host copy probe failed (%s); serving without it", exc)
        return {}
    if "pinned" in gbps and gbps["arena"] < SLOW_ARENA * gbps["pinned"]:
        core.warnings.append(f"the host KV arena copies to the GPU at {gbps['arena']:.1f} GB/s, page-locked memory "
                             f"of the worker's own at {gbps['pinned']:.1f} GB/s: turns that stream their prefix "
                             f"are slower by as much (is the store's memory on another NUMA node than the GPU?)")
    return gbps
