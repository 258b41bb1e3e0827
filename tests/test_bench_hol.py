"""``lsa bench hol``'s timing, without a server: short requests go out open loop (the k-th at
start + k / rate, however long each takes), and only those sent before the long request's
first token count as behind its prefill."""
import time

from benchmarks.hol import shorts_at_rate, summarize


class SlowClient:
    """Streams one chunk after ``seconds``, as a busy server would."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def stream(self, path, body):
        time.sleep(self.seconds)
        yield {"choices": [{"text": "x"}]}


def test_shorts_go_out_at_the_rate_whatever_their_latency():
    start = time.perf_counter() + 0.05
    out = shorts_at_rate(SlowClient(0.5), [[5] * 3] * 5, 1, rate=10, start=start)
    offsets = [s["sent"] - start for s in out]
    assert all(offset >= k / 10 - 0.01 for k, offset in enumerate(offsets)), offsets  # none early
    assert offsets[-1] < 1.0, offsets  # one after the other, the last would leave after 2 s
    assert all(s["ttft_s"] >= 0.5 for s in out), out


def test_only_shorts_sent_before_the_long_first_token_count_as_behind():
    shorts = [{"sent": t, "ttft_s": w, "behind_prefill": t < 2.0} for t, w in [(0.5, 0.4), (1.0, 0.8), (3.0, 0.1)]]
    phases = {"idle": [{"sent": 0.0, "ttft_s": 0.2}] * 3, "behind": shorts,
              "long_alone": {"ttft_s": 1.9}, "long_with_shorts": {"ttft_s": 2.0}}
    s = summarize(phases)
    assert (s["behind_count"], s["after_prefill_count"]) == (2, 1)
    assert s["behind_ttft"]["p99_ms"] == 800 and s["idle_ttft"]["p99_ms"] == 200 and s["p99_ratio"] == 4
