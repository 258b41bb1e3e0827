"""The edge without Ray (tests/edge_local.py: the FastAPI app over the real worker code, in one
process): the ingress never stalls, because body decoding, validation and tokenization run on
the edge's threads while the event loop keeps answering."""
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
from edge_local import serve_edge  # noqa: E402

BIG = 10 << 20
TOKENIZE_S = 1.5


def post(url, body: bytes):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_answer_in_milliseconds_while_a_10mb_body_is_tokenized(tmp_path):
    with serve_edge(str(tmp_path), max_body_bytes=BIG + 4096) as (url, edge, _):
        encode = edge.tokenizer.encode
        started = threading.Event()

        def slow_encode(text, *args, **kwargs):  # a slow tokenizer: would block the loop if called on it
            started.set()
            time.sleep(TOKENIZE_S)
            return encode(text, *args, **kwargs)

        edge.tokenizer.encode = slow_encode
        result = {}
        body = json.dumps({"prompt": "x" * BIG, "max_tokens": 1}).encode()
        big = threading.Thread(target=lambda: result.update(answer=post(url + "/v1/completions", body)))
        t0 = time.perf_counter()
        big.start()
        assert started.wait(30)
        latencies = []
        while big.is_alive():
            t = time.perf_counter()
            with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
                assert json.loads(resp.read())["data"][0]["id"] == "tiny-random"
            latencies.append(time.perf_counter() - t)
        big.join()
        assert time.perf_counter() - t0 >= TOKENIZE_S  # the models calls overlapped the tokenization
        assert len(latencies) >= 5 and max(latencies) < 0.5, latencies
        status, answer = result["answer"]  # 10 M tokens is over the tiny model's context: a 400 naming prompt
        assert status == 400 and answer["error"]["param"] == "prompt", answer
        assert answer["error"]["code"] == "context_length_exceeded"
