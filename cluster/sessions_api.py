"""``/v1/sessions``: a long context prefilled once, then questions as turns on its held KV.

A session's record (context ids, holder, owner) lives in the session directory, shared by
every ingress replica. With API keys, a session belongs to the key that created it: for any
other key it does not exist (404, the same answer as an unknown id, so ids do not leak).

With prefill workers (``prefill_workers > 0``) a session is created by one of them; its first
turn goes to the decode worker with the most free KV (the router reserves the session's bytes
there), which adopts the session from the store, and later turns to that holder.
"""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from cluster import protocol_sessions as ps
from cluster.openai_api import DONE, cached_tokens, sampling_params, sse
from cluster.taxonomy import EdgeError, call_worker, error_answer

DOC_HEAD = "Read the following document carefully and answer the questions after it.\n\n<document>\n"
DOC_TAIL = "\n</document>\n\n"
QUESTION = "Question: {question} Answer in one short sentence."
SENTINEL = "\x00LSA-SPLIT\x00"


class SessionsAPI:
    def __init__(self, edge, directory):
        self.edge, self.directory = edge, directory

    # -- token ids (on the edge's threads) -------------------------------------------------

    def context_ids(self, req: ps.SessionCreate) -> list[int]:
        if req.context_ids is not None:
            return list(req.context_ids)
        tok = self.edge.tokenizer
        framed = DOC_HEAD + req.context + DOC_TAIL + SENTINEL
        text = tok.chat_prompt([{"role": "user", "content": framed}]) if tok.has_chat_template else framed
        return tok.encode(text.split(SENTINEL)[0], add_special_tokens=False)

    def question_ids(self, req: ps.SessionAsk) -> list[int]:
        if isinstance(req.question, list):
            return list(req.question)
        tok, suffix = self.edge.tokenizer, ""
        if tok.has_chat_template:
            suffix = tok.chat_prompt([{"role": "user", "content": SENTINEL}]).split(SENTINEL)[1]
        return tok.encode(QUESTION.format(question=req.question.strip()) + suffix, add_special_tokens=False)

    # -- the routes -----------------------------------------------------------------------

    async def create(self, req: ps.SessionCreate, owner: str | None) -> ps.SessionCreated:
        edge = self.edge
        context_ids = await edge.off_loop(self.context_ids, req)
        if len(context_ids) >= edge.max_model_len:
            raise EdgeError(400, f"the context has {len(context_ids)} tokens; this model's context holds "
                            f"{edge.max_model_len} with the questions and answers", "invalid_request_error",
                            "context" if req.context is not None else "context_ids", "context_length_exceeded")
        session_id = uuid.uuid4().hex
        start = time.perf_counter()
        creator = edge.prefill if edge.prefill is not None else edge.worker
        out = await call_worker(creator.options(method_name="create_session"), session_id=session_id,
                                context_ids=context_ids, kv_bytes=len(context_ids) * edge.kv_bytes_per_token)
        await self.directory.create.remote(session_id, context_ids, out.replica, out.node_id, owner)
        edge.metrics.answered(out, stateless=False, elapsed_s=time.perf_counter() - start)
        return ps.SessionCreated(id=session_id, num_tokens=len(context_ids), prefill_tokens=out.prefill_tokens,
                                prefill_s=round(out.prefill_s, 4), replica=out.replica, node=out.node_id,
                                ingress=edge.replica)

    async def record(self, session_id: str, owner: str | None):
        """The session's directory record, without its context ids (a turn does not ship them: a
        worker that must prefill the session again reads them from the directory); 404 when
        unknown, or another key's."""
        record = await self.directory.get.remote(session_id, False)
        if record is None or (owner is not None and getattr(record, "owner", None) != owner):
            raise EdgeError(404, f"no session {session_id} (deleted, evicted, expired or never created): create it "
                            f"with POST /v1/sessions", "session_not_found", None, "session_not_found")
        return record

    async def ask(self, session_id: str, req: ps.SessionAsk, owner: str | None) -> ps.SessionAnswer:
        edge = self.edge
        start = time.perf_counter()
        record = await self.record(session_id, owner)
        question_ids = await edge.off_loop(self.question_ids, req)
        limit = req.max_tokens or edge.config.default_max_tokens
        params = sampling_params(req, limit, default_temperature=0.0)  # session turns: greedy by default
        ingress_s = time.perf_counter() - start
        try:
            out = await self._call("ask", session_id=session_id, question_ids=question_ids, params=params,
                                   holder=record.replica, kv_bytes=record.num_tokens * edge.kv_bytes_per_token)
        except Exception as exc:
            if error_answer(exc)[1].error.type == "session_not_found":  # evicted: the client creates it again
                await self.directory.delete.remote(session_id)
            raise
        self.directory.served.remote(session_id, out.replica, out.node_id)
        edge.metrics.answered(out, stateless=False, elapsed_s=time.perf_counter() - start)
        return self._answer(session_id, out, ingress_s)

    async def ask_stream(self, session_id: str, req: ps.SessionAsk, owner: str | None) -> AsyncIterator[bytes]:
        """A turn as Server-Sent Events: ``{"text": piece}`` as tokens decode, then the answer
        (the fields of a plain ask), then ``[DONE]``. The first item is awaited here, so that a
        bad request or an unknown session is a 4xx, not a broken stream."""
        edge = self.edge
        start = time.perf_counter()
        record = await self.record(session_id, owner)
        question_ids = await edge.off_loop(self.question_ids, req)
        params = sampling_params(req, req.max_tokens or edge.config.default_max_tokens, default_temperature=0.0)
        ingress_s = time.perf_counter() - start
        gen = edge.worker.options(method_name="ask_stream", stream=True).remote(
            session_id=session_id, question_ids=question_ids, params=params, holder=record.replica,
            kv_bytes=record.num_tokens * edge.kv_bytes_per_token)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            if error_answer(exc)[1].error.type == "session_not_found":
                await self.directory.delete.remote(session_id)
            raise

        async def events():
            item = first
            try:
                while item is not None:
                    if not isinstance(item, str):  # the TurnResult closes the turn
                        self.directory.served.remote(session_id, item.replica, item.node_id)
                        edge.metrics.answered(item, stateless=False, elapsed_s=time.perf_counter() - start)
                        yield sse(self._answer(session_id, item, ingress_s))
                        break
                    yield sse({"text": item})
                    item = await gen.__anext__()
            except StopAsyncIteration:
                pass
            except Exception as exc:  # noqa: BLE001 - mid-stream: one error event, then [DONE]
                yield sse(error_answer(exc)[1])
            yield DONE

        return events()

    def _answer(self, session_id: str, out, ingress_s: float = 0.0) -> ps.SessionAnswer:
        return ps.SessionAnswer(session=session_id, text=out.text, num_tokens=len(out.token_ids),
                               prefill_tokens=out.prefill_tokens, cached_tokens=cached_tokens(out),
                               decode_s=round(out.decode_s, 4), prefill_s=round(out.prefill_s, 4),
                               finish_reason=out.finish_reason, replica=out.replica, node=out.node_id, held=out.held,
                               ingress=self.edge.replica,
                               timings={"ingress": round(ingress_s, 6), **(getattr(out, "timings", None) or {})})

    async def delete(self, session_id: str, owner: str | None) -> ps.SessionDeleted:
        await self.record(session_id, owner)
        if await self.directory.delete.remote(session_id) is None:  # deleted meanwhile by another request
            await self.record(session_id, None)
        await self._call("delete_session", session_id=session_id)
        return ps.SessionDeleted(deleted=session_id)

    async def _call(self, method: str, **kwargs):
        return await call_worker(self.edge.worker.options(method_name=method), **kwargs)
