"""Multi-turn chats over long documents through the official ``openai`` client: does a served
conversation reuse the KV of its earlier turns, and what does that do to its time to first token?

Two conversations, each over its own document of about ``--context`` tokens, take ``--turns``
turns each, interleaved (A1 B1 A2 B2 ...): every turn sends the whole conversation so far
(document, earlier questions and answers, the new question) as a stateless chat request,
streamed with ``stream_options.include_usage``. Per turn: prompt tokens, ``cached_tokens``
(usage.prompt_tokens_details: KV the server reused), tokens prefilled (the difference), the turn's
new tokens (its prompt less the previous turn's prompt and answer), the time to the first
content chunk (TTFT) and its ratio to the conversation's first turn, and the decode replica
that answered (the one whose ``lsa_generated_tokens`` on ``/metrics`` grew by the turn's
tokens: turns run one at a time). ``--pin`` sends each
conversation's ``user`` field, which pins it to one decode replica (its session key); without
it the router follows the prompt's longest held prefix.

Issue 12's targets, checked in the table: turns 2..N prefill only their new tokens (here: at
most ``--slack`` tokens more: the partial last block and the policy's observation window are
computed again), their TTFT is at most 15% of the first turn's, and each conversation stays on
the replica that holds it.

    lsa bench chat model=smollm2-135m num_workers=2 --context 6000 --turns 10 --out chat.json
    lsa bench chat --url http://127.0.0.1:8000 --context 6000
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.request

from benchmarks import served

QUESTIONS = [
    "In one sentence, what is this text about?",
    "Name one person, place or thing the text mentions.",
    "What is the author's main claim?",
    "Quote a short phrase from the middle of the text.",
    "What would a critic say against the main claim?",
    "List two words the text uses often.",
    "What question does the text leave open?",
    "Summarize the last paragraph in one sentence.",
    "Who is the text written for?",
    "Give the text a short title.",
]
TTFT_TARGET = 0.15


def documents(context_tokens: int, haystack: str | None) -> list[str]:
    """Two documents of about ``context_tokens`` tokens each (4 characters a token), from the
    haystack text when there is one, else synthetic filler."""
    from lab.haystack import load_haystack

    chars = context_tokens * 4
    text = load_haystack(haystack, min_chars=2 * chars + 1)
    return [text[:chars], text[chars:2 * chars]]


def generated_by_replica(url: str, api_key: str) -> dict[str, float] | None:
    """``lsa_generated_tokens`` per decode replica from ``/metrics`` (None when not readable:
    an app with API keys needs its admin key here)."""
    request = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        if line.startswith("lsa_generated_tokens{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('replica="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def answering_replica(url: str, api_key: str, before: dict[str, float] | None, tokens: int,
                      wait_s: float = 6.0) -> str | None:
    """The replica whose generated-token count grew by at least ``tokens`` since ``before``
    (workers publish their counters about once a second)."""
    if before is None:
        return None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        now = generated_by_replica(url, api_key) or {}
        grown = [r for r, v in now.items() if v - before.get(r, 0.0) >= tokens]
        if len(grown) == 1:
            return grown[0]
        time.sleep(0.25)
    return None


def one_turn(oa, model: str, messages: list[dict], max_tokens: int, user: str | None) -> dict:
    extra = {"user": user} if user else {}
    t0 = time.perf_counter()
    stream = oa.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                        stream=True, stream_options={"include_usage": True}, **extra)
    first, pieces, usage = None, [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
    return {"ttft_s": first if first is not None else time.perf_counter() - t0, "seconds": time.perf_counter() - t0,
            "text": "".join(pieces), "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "cached_tokens": cached, "prefilled_tokens": usage.prompt_tokens - cached}


def run_chats(url: str, context: int, turns: int, max_tokens: int, pin: bool, haystack: str | None,
              api_key: str) -> list[dict]:
    try:
        import openai
    except ImportError:
        from engine.errors import InvalidRequestError

        raise InvalidRequestError("lsa bench chat drives the server with the official client: pip install openai")
    oa = openai.OpenAI(base_url=url + "/v1", api_key=api_key, timeout=1800, max_retries=0)
    model = oa.models.list().data[0].id
    conversations = [{"id": name, "messages": [], "last": None} for name in ("A", "B")]
    rows = []
    for turn in range(turns):
        for conv, document in zip(conversations, documents(context, haystack)):
            question = QUESTIONS[turn % len(QUESTIONS)]
            if turn == 0:
                question = f"Read this text.\n\n{document}\n\n{question}"
            conv["messages"].append({"role": "user", "content": question})
            before = generated_by_replica(url, api_key)
            try:
                out = one_turn(oa, model, conv["messages"], max_tokens, conv["id"] if pin else None)
            except openai.APIStatusError as exc:  # e.g. a conversation grown past the model's context
                from engine.errors import InvalidRequestError

                raise InvalidRequestError(f"turn {conv['id']}{turn + 1} was refused: {exc.message} "
                                          f"(a smaller --context or fewer --turns?)") from None
            out["replica"] = answering_replica(url, api_key, before, out["completion_tokens"])
            conv["messages"].append({"role": "assistant", "content": out["text"]})
            last = conv["last"]
            out.update(conversation=conv["id"], turn=turn + 1,
                       new_tokens=out["prompt_tokens"] - (last["prompt_tokens"] + last["completion_tokens"])
                       if last else out["prompt_tokens"])
            conv["last"] = out
            rows.append(out)
            print(f"  {conv['id']}{turn + 1}: prompt {out['prompt_tokens']}, cached {out['cached_tokens']}, "
                  f"TTFT {out['ttft_s']:.2f} s, replica {out['replica']}", file=sys.stderr)
    return rows


def summarize(rows: list[dict], slack: int) -> dict:
    out = {}
    for conv in sorted({r["conversation"] for r in rows}):
        mine = [r for r in rows if r["conversation"] == conv]
        first, later = mine[0], mine[1:]
        for r in mine:
            r["ttft_ratio"] = r["ttft_s"] / first["ttft_s"]
        out[conv] = {
            "first_ttft_s": first["ttft_s"],
            "later_ttft_median_s": statistics.median(r["ttft_s"] for r in later) if later else None,
            "later_ttft_ratio_max": max((r["ttft_ratio"] for r in later), default=None),
            "later_prefilled_over_new_max": max((r["prefilled_tokens"] - r["new_tokens"] for r in later), default=None),
            "prefill_only_new": all(r["prefilled_tokens"] <= r["new_tokens"] + slack for r in later),
            "ttft_target_met": all(r["ttft_ratio"] <= TTFT_TARGET for r in later),
            "replicas": sorted({r["replica"] or "unknown" for r in mine}),
            "stays_on_holder": None if any(r["replica"] is None for r in mine)
            else len({r["replica"] for r in mine}) == 1,
        }
    return out


def print_table(rows: list[dict], summary: dict) -> None:
    print("| turn | prompt | cached | prefilled | new | TTFT s | / turn 1 | replica |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['conversation']}{r['turn']} | {r['prompt_tokens']} | {r['cached_tokens']} | "
              f"{r['prefilled_tokens']} | {r['new_tokens']} | {r['ttft_s']:.2f} | {r['ttft_ratio']:.3f} | "
              f"{(r['replica'] or '?')[:8]} |")
    for conv, s in summary.items():
        print(f"{conv}: turn 1 TTFT {s['first_ttft_s']:.2f} s; later turns median {s['later_ttft_median_s']:.2f} s, "
              f"at most {s['later_ttft_ratio_max']:.3f} of turn 1 (target {TTFT_TARGET}: "
              f"{'met' if s['ttft_target_met'] else 'MISSED'}); prefilled at most "
              f"{s['later_prefilled_over_new_max']} tokens over the new ones "
              f"({'only new' if s['prefill_only_new'] else 'MORE than the new tokens'}); replicas "
              f"{', '.join(x[:8] for x in s['replicas'])} ("
              f"{ {True: 'stays on its holder', False: 'MOVED', None: 'unknown'}[s['stays_on_holder']]})")


def run_bench(args) -> int:
    from engine.errors import InvalidRequestError

    app_args = served.app_args(args)
    if args.turns < 2 or args.context < 16 or args.max_tokens < 1:
        raise InvalidRequestError("--turns must be >= 2, --context >= 16 and --max-tokens >= 1")
    t0 = time.perf_counter()
    with served.app_url(args, app_args) as url:
        rows = run_chats(url, args.context, args.turns, args.max_tokens, args.pin, args.haystack, args.api_key)
    summary = summarize(rows, args.slack)
    report = {"app_args": app_args, "url": args.url, "context": args.context, "turns": args.turns,
              "max_tokens": args.max_tokens, "pin": args.pin, "slack": args.slack, "rows": rows,
              "summary": summary, "seconds": time.perf_counter() - t0}
    return served.finish(report, args.out, lambda _: print_table(rows, summary))


def add_arguments(p: argparse.ArgumentParser) -> None:
    served.add_arguments(p)
    p.add_argument("--api-key", default="none", help="the app's API key, if it has keys")
    p.add_argument("--context", type=int, default=6000, help="tokens of each document (about)")
    p.add_argument("--turns", type=int, default=10, help="turns of each conversation")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens of each answer (at most)")
    p.add_argument("--pin", action="store_true", help="send each conversation's user field (its session key)")
    p.add_argument("--slack", type=int, default=64, help="tokens a later turn may prefill beyond its new ones")
    p.add_argument("--haystack", default=None, help="folder of texts (default: the shared haystack, else filler)")
    p.add_argument("--out", default=None, help="JSON report")


if __name__ == "__main__":
    from benchmarks.commands import main

    raise SystemExit(main("chat"))
