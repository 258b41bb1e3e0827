"""The tensor-parallel worker's core without Ray: a fake group in place of the rank actors. Answers
and streamed text, a refusal that fails one request only, a cancelled request aborted on the ranks,
a failed group that fails what is in flight and every later request, and the deployment's health
check that finds a rank that died while the group was idle."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from actors.tp_worker import TensorParallelWorkerCore
from engine.errors import InvalidRequestError, LSAError
from engine.parallel.rank import Finished, TokenUpdate
from engine.sampling import SamplingParams


class GroupGone(LSAError, RuntimeError):
    pass


class FakeGroup:
    """TensorParallelEngine's lockstep calls: each request gains token 7 (text "a") per step."""

    size = 2

    def __init__(self):
        self.failure: str | None = None  # set by the first call after ``kill``
        self.dead: str | None = None
        self.running: dict[str, int] = {}  # request_id -> tokens left
        self.aborted: list[str] = []
        self.lock = threading.Lock()

    def kill(self, message: str):
        with self.lock:
            self.dead = message

    def _check(self):
        if self.dead:
            self.failure = self.dead
            raise GroupGone(self.failure)

    def shutdown(self):
        self.running.clear()

    def has_work(self):
        self._check()
        return bool(self.running)

    def add_request(self, prompt, params, request_id):
        self._check()
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        self.running[request_id] = params.max_tokens

    def abort(self, request_id):
        self._check()
        self.aborted.append(request_id)
        return self.running.pop(request_id, None) is not None

    def step(self):
        time.sleep(0.005)
        with self.lock:
            self._check()
            updates = []
            for request_id in list(self.running):
                self.running[request_id] -= 1
                done = self.running[request_id] == 0
                finished = Finished("a" * 3, 0.1, 0.2, {"kv": 1}) if done else None
                updates.append(TokenUpdate(request_id, [7], "length" if done else None, "a", finished))
                if done:
                    del self.running[request_id]
            return updates


@pytest.fixture()
def core():
    group = FakeGroup()
    core = TensorParallelWorkerCore(group, node_id="n1", vocab_size=10)
    yield core
    core.close()


def test_answers_and_streamed_text(core):
    texts = []
    out = core.generate([1, 2, 3], SamplingParams(max_tokens=3), on_text=lambda t, done: texts.append((t, done)))
    result = out.result(timeout=5)
    assert result.token_ids == [7, 7, 7] and result.text == "aaa" and result.finish_reason == "length"
    assert result.num_prompt_tokens == 3 and result.prefill_tokens == 3 and result.kv == {"kv": 1}
    assert texts == [("a", False), ("aa", False), ("aaa", True)]
    assert core.stats().generated_tokens == 3 and core.idle()


def test_a_refused_request_fails_alone(core):
    other = core.generate([1], SamplingParams(max_tokens=20))
    with pytest.raises(InvalidRequestError, match="empty"):
        core.generate([], SamplingParams(max_tokens=2)).result(timeout=5)
    assert other.result(timeout=5).token_ids == [7] * 20 and core.failure is None


def test_a_cancelled_request_is_aborted_on_the_ranks(core):
    doomed = core.generate([1], SamplingParams(max_tokens=10_000))
    deadline = time.monotonic() + 5
    while not core.engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert doomed.cancel()
    while core.engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert core.engine.aborted == ["tp-0"] and not core.engine.running and core.stats().cancelled == 1


def test_a_failed_group_fails_everything_in_flight_and_after(core):
    running = core.generate([1], SamplingParams(max_tokens=10_000))
    deadline = time.monotonic() + 5
    while not core.engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    core.engine.kill("rank 1 of 2 failed during step")
    with pytest.raises(GroupGone, match="rank 1"):
        running.result(timeout=5)
    with pytest.raises(GroupGone, match="rank 1"):
        core.generate([1], SamplingParams(max_tokens=2)).result(timeout=5)
    assert core.failure == "rank 1 of 2 failed during step"


def test_the_health_check_finds_a_rank_that_died_while_idle(core):
    from actors.tp_deployment import TensorParallelWorker

    worker = object.__new__(TensorParallelWorker.func_or_class)
    worker.core, worker.call_timeout_s = core, 5
    asyncio.run(worker.check_health())
    core.engine.kill("rank 1 of 2 failed during has_work")
    assert core.failure is None  # nothing has called the ranks since
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed during has_work"):
        asyncio.run(worker.check_health())
    with pytest.raises(GroupGone):
        core.generate([1], SamplingParams(max_tokens=2)).result(timeout=5)


@pytest.mark.parametrize("args, error", [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be >= 1"),
    ({"tensor_parallel_size": 2, "prefill_workers": 1}, "set prefill_workers=0"),
    ({"tensor_parallel_size": 4}, "num_key_value_heads=2 is not divisible by the tensor-parallel size 4"),
    ({"tensor_parallel_size": 2, "policy": "quest"}, "policy 'quest' is not supported with tensor parallelism"),
])
def test_the_app_checks_tensor_parallel_arguments_before_any_replica(args, error):
    from actors.config import ServeConfig
    from actors.tp_deployment import check_tensor_parallel
    from engine.options import build

    with pytest.raises(LSAError, match=error):
        check_tensor_parallel(build(ServeConfig, {"model": "tiny-random", **args}))


def test_each_replica_asks_for_its_bundle_and_one_per_rank():
    from actors.config import ServeConfig
    from actors.tp_deployment import deployment_options
    from engine.options import build

    cfg = build(ServeConfig, {"model": "tiny-random", "tensor_parallel_size": 2, "worker_num_gpus": 1,
                              "worker_resources": "lsa_decode=1"})
    options = deployment_options(cfg)
    assert options["placement_group_bundles"] == [{"CPU": 1.0, "lsa_decode": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert options["placement_group_strategy"] == "STRICT_PACK" and options["ray_actor_options"]["num_gpus"] == 0
