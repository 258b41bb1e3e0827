"""OpenAI's API over the decode workers: a parsed request (cluster/protocol.py) becomes token
ids and ``SamplingParams``; ``TurnResult``s (actors/messages.py) become a ``Completion`` /
``ChatCompletion``, or SSE chunks when streamed.

    request --prompt_ids, sampling--> n worker calls (n choices; seed+i for choice i)
            <--TurnResult x n-------- answer(): choices, usage (cached_tokens: reused prompt KV)
            <--pieces, TurnResult---- stream_events(): chunks per choice, then a usage chunk
                                      when stream_options.include_usage, then [DONE]
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Callable

from cluster import protocol as p
from engine.sampling import SamplingParams


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def sampling_params(req: p.Sampling, max_tokens: int, seed_offset: int = 0, default_temperature: float = 1.0,
                    logprobs: int | None = None) -> SamplingParams:
    """The engine's parameters of a request; ``max_tokens`` is the request's (already resolved)."""
    fields = dict(max_tokens=max_tokens,
                  temperature=default_temperature if req.temperature is None else req.temperature,
                  top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, stop=req.stops,
                  ignore_eos=bool(req.ignore_eos), presence_penalty=req.presence_penalty or 0.0,
                  frequency_penalty=req.frequency_penalty or 0.0,
                  seed=None if req.seed is None else (req.seed + seed_offset) % (1 << 63))
    if logprobs is not None:
        fields["logprobs"] = logprobs  # engine support: SamplingParams.logprobs (engine/logprobs.py)
    return SamplingParams(**fields)


def chat_messages(req: p.ChatCompletionRequest) -> list[dict]:
    """Messages as the chat template takes them: role and text (text parts joined)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]


def cached_tokens(out) -> int:
    """Prompt tokens whose KV was reused (a session's, prefix blocks), not computed: the core's
    ``TurnResult.cached_tokens``."""
    return int(out.cached_tokens)


def usage(num_prompt: int, outs: list) -> p.Usage:
    completion = sum(len(o.token_ids) for o in outs)
    return p.Usage(prompt_tokens=num_prompt, completion_tokens=completion, total_tokens=num_prompt + completion,
                   prompt_tokens_details=p.PromptTokensDetails(cached_tokens=max(map(cached_tokens, outs))))


# ------------------------------------------------------------------------------- logprobs


def chat_logprobs(entries: list | None, decode: Callable[[list[int]], str]) -> p.ChoiceLogprobs | None:
    """``entries``: per generated token ``(token_id, logprob, [(id, logprob), ...])``."""
    if entries is None:
        return None

    def top(token_id: int, logprob: float) -> p.TopLogprob:
        text = decode([token_id])
        return p.TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return p.ChoiceLogprobs(content=[p.TokenLogprob(**top(t, lp).model_dump(), top_logprobs=[top(*a) for a in alts])
                                     for t, lp, alts in entries])


def completion_logprobs(entries: list | None, decode: Callable[[list[int]], str],
                        offset: int = 0) -> p.CompletionLogprobs | None:
    if entries is None:
        return None
    tokens = [decode([t]) for t, _, _ in entries]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return p.CompletionLogprobs(tokens=tokens, token_logprobs=[lp for _, lp, _ in entries],
                                top_logprobs=[{decode([t]): lp for t, lp in alts} for _, _, alts in entries],
                                text_offset=offsets)


# ------------------------------------------------------------------------------- answers


def answer(chat: bool, rid: str, model: str, num_prompt: int, outs: list,
           decode: Callable[[list[int]], str]) -> p.Completion | p.ChatCompletion:
    created, use = int(time.time()), usage(num_prompt, outs)
    if chat:
        choices = [p.ChatChoice(index=i, message=p.AssistantMessage(content=o.text), finish_reason=o.finish_reason,
                                logprobs=chat_logprobs(getattr(o, "logprobs", None), decode))
                   for i, o in enumerate(outs)]
        return p.ChatCompletion(id=rid, created=created, model=model, choices=choices, usage=use)
    choices = [p.CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason,
                                  logprobs=completion_logprobs(getattr(o, "logprobs", None), decode))
               for i, o in enumerate(outs)]
    return p.Completion(id=rid, created=created, model=model, choices=choices, usage=use)


def sse(payload: dict | p.Reply) -> bytes:
    if isinstance(payload, p.Reply):
        payload = payload.model_dump(exclude_none=True)
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


DONE = b"data: [DONE]\n\n"


async def first_items(streams: list) -> list:
    """Await each stream's first item (so that a bad request fails before the 200 is sent);
    a stream with nothing gets None."""
    async def first(stream):
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None
    return list(await asyncio.gather(*(first(s) for s in streams)))


async def stream_events(chat: bool, rid: str, model: str, num_prompt: int, streams: list, firsts: list,
                        include_usage: bool, decode: Callable[[list[int]], str],
                        on_error: Callable[[BaseException], dict], is_result: Callable[[object], bool],
                        on_token: Callable[[float], None] | None = None,
                        on_result: Callable[[object], None] | None = None) -> AsyncIterator[bytes]:
    """SSE bytes of ``streams`` (one per choice; each yields text pieces, then its TurnResult),
    merged as pieces arrive. An error mid-stream is one ``{"error": ...}`` event before [DONE].
    ``on_token(now)`` is called at each text piece, ``on_result(result)`` at each choice's end."""
    created = int(time.time())
    head = dict(id=rid, created=created, model=model)
    usage_field = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str | None = None, role: str | None = None, finish: str | None = None,
              logprobs=None) -> bytes:
        if chat:
            choice = p.ChunkChoice(index=index, delta=p.Delta(role=role, content=text), finish_reason=finish,
                                   logprobs=chat_logprobs(logprobs, decode))
            body = p.ChatCompletionChunk(**head, choices=[choice]).model_dump(exclude_none=True)
        else:
            choice = p.CompletionChoice(index=index, text=text or "", finish_reason=finish,
                                        logprobs=completion_logprobs(logprobs, decode))
            body = p.Completion(**head, choices=[choice]).model_dump(exclude_none=True)
        body["choices"][0].setdefault("finish_reason", None)
        return sse({**body, **usage_field})

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream, item) -> None:
        try:
            while item is not None:
                await queue.put((index, item))
                if is_result(item):
                    return
                item = await stream.__anext__()
        except StopAsyncIteration:
            pass
        except BaseException as exc:  # noqa: BLE001 - the client hears of it
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
    results: dict[int, object] = {}
    try:
        if chat:
            for i in range(len(streams)):
                yield chunk(i, role="assistant", text="")
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                yield sse(on_error(item))
                break
            elif is_result(item):
                results[index] = item
                if on_result is not None:
                    on_result(item)
                yield chunk(index, finish=item.finish_reason, logprobs=getattr(item, "logprobs", None))
            else:
                if on_token is not None:
                    on_token(time.perf_counter())
                yield chunk(index, text=item)
        else:
            if include_usage and len(results) == len(streams):
                outs = [results[i] for i in range(len(streams))]
                body = (p.ChatCompletionChunk if chat else p.Completion)(**head, choices=[]).model_dump(
                    exclude_none=True)
                yield sse({**body, "usage": usage(num_prompt, outs).model_dump()})
        yield DONE
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:
                cancel()  # the client went away: the worker drops the sequence
