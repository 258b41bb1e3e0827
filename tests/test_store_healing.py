"""A decode worker whose node store dies moves to the store that replaces it (no Ray: the
store's death is simulated; tests/test_cluster_faults would kill the actor): it is not ready
while no store answers, then it maps the new arena, and the turns in flight run once more
(sessions re-prefilled from the context the caller passes), each answered exactly once."""
import threading
import time

import torch

from actors.decode_worker import DecodeWorkerCore
from actors.kv_store import KVStoreCore, arena_path
from engine.errors import StoreUnavailable
from engine.factory import ByteTokenizer
from engine.host_arena import ArenaLayout
from engine.llm import LLMEngine
from engine.sampling import SamplingParams
import tiny
from tiny import BYTES, engine_config

BLOCK = 8
LAYOUT = ArenaLayout.of(BYTES, BLOCK, torch.float32)
LONG = SamplingParams(max_tokens=20, ignore_eos=True)


class MortalStore:
    """A node store that can die: every call then raises StoreUnavailable, as RayStore does."""

    def __init__(self, core: KVStoreCore):
        self.core, self.dead = core, False

    def __getattr__(self, name):
        attr = getattr(self.core, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.dead:
                raise StoreUnavailable(f"the node's KV store does not answer {name}")
            return attr(*args, **kwargs)
        return call


MODEL, SEED = BYTES, 11  # the conftest's model fixture


def config():
    return engine_config(BLOCK)


def tokens(n, seed):
    return tiny.tokens(n, seed, BYTES.vocab_size, low=4)


def test_a_worker_moves_to_the_new_store_and_reruns_its_turns(tmp_path, model):
    node = {"store": MortalStore(KVStoreCore("n", LAYOUT, 300 * LAYOUT.block_bytes,
                                             arena_path("heal", "n", str(tmp_path), "1")))}

    placed = threading.Event()

    def resolve():  # placement: the node's store, once one is up
        placed.wait()
        return node["store"]

    placed.set()
    worker = DecodeWorkerCore.build(lambda arena: LLMEngine(model, config(), ByteTokenizer(), arena=arena),
                                    node["store"], "w", spare_blocks=0, resolve_store=resolve)
    fresh = LLMEngine(model, config(), ByteTokenizer())
    try:
        context, question, prompt = tokens(100, 1), tokens(6, 2), tokens(40, 3)
        worker.create_session("doc", context).result(timeout=60)
        turn = worker.ask("doc", question, LONG, context_ids=context)
        plain = worker.generate(prompt, LONG)
        while worker.stats().running < 2:
            time.sleep(0.01)
        gate, blocked, step = threading.Event(), threading.Event(), worker.engine.step

        def gated_step():  # holds the decode loop, so that both turns are in flight when the store dies
            if not gate.is_set():
                blocked.set()
                gate.wait()
            return step()
        worker.engine.step = gated_step
        assert blocked.wait(30)
        placed.clear()
        node["store"].dead = True  # the store dies; placement has not made a new one yet
        worker.healing.store_lost()  # what a failed store call or the health check's ping does
        time.sleep(0.05)
        assert not worker.healing.ready and worker.stats().running == 2  # the health check fails meanwhile
        node["store"] = MortalStore(KVStoreCore("n", LAYOUT, 300 * LAYOUT.block_bytes,
                                                arena_path("heal", "n", str(tmp_path), "2")))
        placed.set()
        deadline = time.monotonic() + 30
        while worker._commands.empty() and time.monotonic() < deadline:  # the healer maps the new arena
            time.sleep(0.01)
        gate.set()  # one more step, then the loop moves to the new store
        answer, other = turn.result(timeout=120), plain.result(timeout=120)
        assert answer.token_ids == fresh.generate([context + question], LONG)[0].token_ids
        # the session was prefilled again, then the turn: its partial context block and the question
        assert answer.prefill_tokens == len(context) + len(context) % BLOCK + len(question)
        assert other.token_ids == fresh.generate([prompt], LONG)[0].token_ids
        assert worker.healing.ready and worker.stats().store_generation == 1
        assert worker.store is node["store"] and worker.store.has("doc")
        follow_up = worker.ask("doc", question, SamplingParams(max_tokens=5, ignore_eos=True)).result(timeout=60)
        assert follow_up.prefill_tokens < BLOCK + len(question)  # served from the new store
    finally:
        worker.close()
