"""Forwarding one OpenAI-style request to a replica, with failover, and relaying its answer.

Like dstack's model proxy, nothing is answered before the engine has: the status line and, for a stream,
the first chunk are read first. Until then a failure (connect error, timeout, 5xx, empty stream) is still
ours to handle: the request goes once to another replica, and if that fails too the client gets a proper
error (502, or 504 for a timeout) in OpenAI's shape. After the first chunk the stream is relayed event by
event as it arrives; if the engine fails then, the client gets an SSE error event (OpenAI's error shape)
and the end of the stream, never a hang.

Whose failure it is: a 4xx is the client's and is relayed as it is. A 5xx is the replica's only when another
replica answers the same request: then the first is suspect (avoided for a few seconds). When the second
answers 5xx too, the request itself is the cause (an image sent to a text-only model): the engine's status
and message are relayed and neither replica is marked. Connection failures and timeouts always mark the
replica.

Non-streaming answers are read whole (they are JSON, and reading them lets a failure mid-body still be
retried), then sent. Streams are relayed without buffering beyond the current SSE event, and the upstream
response is closed as soon as the client goes away, which cancels the generation in the engine.

Usage is taken from what the engine reports: `usage` in a JSON answer, or the last chunk carrying usage
in a stream. For streams the gateway asks for that chunk (`stream_options.include_usage`) when the
client did not, and then drops it from what the client sees.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from lmstack.api.errors import ApiError, error_body
from lmstack.api.gateway.affinity import prompt_keys
from lmstack.api.gateway.registry import GatewayCounters, Registry, ReplicaKey, Target
from lmstack.api.gateway.upstream import Dropped, UpstreamClient, UpstreamError, UpstreamResponse
from lmstack.api.services.usage import UsageRecorder
from lmstack.config import Settings

T = TypeVar("T")

_JSON_HEADERS = {"content-type": "application/json", "accept": "application/json",
                 "accept-encoding": "identity"}  # identity: the raw bytes relayed are the bytes the client reads
_SSE_HEADERS = {**_JSON_HEADERS, "accept": "text/event-stream"}
_STREAM_RESPONSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
_ERROR_EVENT = re.compile(rb'^data:\s*\{\s*"error"\s*:')
_SMALL_JSON = 64 * 1024  # JSON answers up to this size are parsed whole for their usage
CLIENT_CLOSED = 499  # status recorded for a client that went away (nginx's convention)
KEEPALIVE_S = 4.0  # how long an idle connection to an engine is kept for the next request
WATCH_AFTER_S = 0.05  # how long a request runs before the gateway starts watching for its client leaving


@dataclass
class Call:
    """One request to forward: what the client sent and who sent it."""

    path: str  # /v1/chat/completions, /v1/completions, /v1/embeddings
    model: str  # the served name the client asked for
    body: dict[str, Any]  # the parsed JSON body
    raw: bytes  # the body exactly as received, forwarded as is when nothing needs changing
    key_id: int | None
    streamable: bool = True  # whether `stream: true` means SSE here (not for embeddings)
    started: float = field(default_factory=time.perf_counter)
    at: float = field(default_factory=time.time)

    @property
    def stream(self) -> bool:
        return self.streamable and self.body.get("stream") is True

    @property
    def client_wants_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    @property
    def add_usage(self) -> bool:
        """Whether to ask the engine for the usage chunk the client did not ask for (then hidden from it)."""
        options = self.body.get("stream_options")
        return self.stream and not self.client_wants_usage and (options is None or isinstance(options, dict))

    def elapsed_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)

    def answered(self, usage: UsageRecorder, status: int, *, target: Target | None = None, replica: str | None = None,
                 ttft_ms: int = 0, tokens: tuple[int, int] | None = None) -> None:
        """Record what became of this request, once, however it ended (the one place usage is recorded: the
        recorder also feeds the metrics, the traffic series and the token limits)."""
        prompt, completion = tokens or (0, 0)
        usage.record(key_id=self.key_id, model=self.model, replica=target.name if target else replica,
                     status=status, latency_ms=self.elapsed_ms(), ttft_ms=ttft_ms, at=self.at,
                     revision=target.revision if target else None, prompt_tokens=prompt,
                     completion_tokens=completion)


class Lease:
    """A request's place on a replica, from its pick to the end of its answer: counted in the replica's requests
    in flight (what power of two choices and the bounded load compare) until released, exactly once."""

    __slots__ = ("_held", "target")

    def __init__(self, target: Target) -> None:
        self.target = target
        self._held = True
        target.load.outstanding += 1
        target.load.requests += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self.target.load.outstanding -= 1


def upstream_body(call: Call, upstream_model: str) -> bytes:
    """The body to send the engine: the client's bytes unless the model name or stream options change."""
    if call.body.get("model") == upstream_model and not call.add_usage:
        return call.raw
    body = {**call.body, "model": upstream_model}
    if call.add_usage:
        body["stream_options"] = {**(call.body.get("stream_options") or {}), "include_usage": True}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class ClientGone(Exception):
    """The client disconnected before its answer started."""


class _Failure(Exception):
    """A replica failed before answering: the request may still go to another one."""

    def __init__(self, kind: str, error: ApiError, engine_error: ApiError | None = None) -> None:
        super().__init__(error.message)
        self.kind = kind  # connect | timeout | status | stream (counted by kind)
        self.error = error
        self.engine_error = engine_error  # kind "status": the engine's own status and message, to relay


@dataclass
class _Answer:
    """What a replica answered, read up to the point where the gateway commits to it."""

    response: UpstreamResponse
    ttft_ms: int
    content: bytes | None = None  # a whole (non-streamed) answer
    first: bytes = b""  # a stream: its first chunk ...
    rest: AsyncIterator[bytes] | None = None  # ... and the rest


def open_upstream_client(settings: Settings) -> UpstreamClient:
    """The pooled client to the engines (call it on the event loop that will use it)."""
    # Idle connections are dropped before the engines drop them (5 s in uvicorn, which vLLM and SGLang use,
    # and in llama.cpp's server): one the engine has closed may still look open here for a moment.
    return UpstreamClient(connect_timeout_s=settings.upstream_connect_timeout_s,
                          read_timeout_s=settings.upstream_read_timeout_s,
                          first_byte_timeout_s=settings.upstream_first_byte_timeout_s,
                          idle_timeout_s=settings.upstream_idle_timeout_s,
                          dead_host_s=settings.upstream_dead_host_s, keepalive_s=KEEPALIVE_S)


async def forward(call: Call, *, client: UpstreamClient, registry: Registry, usage: UsageRecorder,
                  receive: Receive | None = None) -> Response:
    """Send `call` to a Ready replica of its model (one retry on another replica) and relay the answer.

    Raises ApiError: 503 when no replica is Ready, 502/504 when the replicas tried failed. `receive` is the
    client's ASGI channel: a disconnect before the answer starts abandons the upstream request.
    """
    tried: set[ReplicaKey] = set()
    failure: _Failure | None = None
    failed_on: str | None = None  # the last replica that failed
    # A replica that answered 5xx is judged by what the next one answers: the same request failing there too is
    # the request's fault (an image sent to a text-only model), relayed without marking either replica.
    unconfirmed: Target | None = None
    prefix = prompt_keys(call.model, call.path, call.body) if registry.prefixes is not None else ()
    for attempt in range(2):
        target = registry.pick(call.model, tried, prefix)
        if target is None:
            break
        if attempt:
            registry.counters.retries += 1
        tried.add(target.key)
        lease = Lease(target)
        try:
            answer = await _unless_gone(_ask(client, target, call, registry.counters), receive)
        except _Failure as exc:
            lease.release()
            if exc.kind == "status" and unconfirmed is not None and exc.engine_error is not None:
                call.answered(usage, exc.engine_error.status, target=target)
                raise exc.engine_error from None
            if exc.kind == "status" and attempt == 0:
                unconfirmed = target
            else:
                registry.failed(target, exc.kind)
            failure, failed_on = exc, target.name
            continue
        except ClientGone:
            lease.release()
            registry.counters.client_disconnects += 1
            call.answered(usage, CLIENT_CLOSED, target=target)
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it
        except BaseException:
            lease.release()
            raise
        registry.succeeded(target)
        if unconfirmed is not None:
            registry.failed(unconfirmed, "status")  # another replica answered: the error was the replica's own
        if answer.rest is not None:
            return RelayResponse(_Relay(call=call, lease=lease, answer=answer, registry=registry, usage=usage))
        lease.release()
        return _whole(call, target, answer, usage)

    if unconfirmed is not None and failed_on == unconfirmed.name:
        registry.failed(unconfirmed, "status")  # no other replica to ask
    if failure is None:
        error = ApiError(503, f"no Ready replica of model {call.model!r} right now; try again shortly",
                         code="model_unavailable")
    else:
        error = failure.error
    call.answered(usage, error.status, replica=failed_on)
    raise error


async def _ask(client: UpstreamClient, target: Target, call: Call, counters: GatewayCounters) -> _Answer:
    """Send the request and read the answer's status (and first chunk, for a stream); _Failure if it fails."""
    # Clients learn which replica failed, never where it runs (engine addresses are for admins).
    where = f"replica {target.name} of {target.served_name!r}"
    response: UpstreamResponse | None = None
    try:
        # Redirects are relayed as they are, never followed (that would resend the body elsewhere).
        data = upstream_body(call, target.upstream_model)
        headers = _SSE_HEADERS if call.stream else _JSON_HEADERS
        if target.auth:
            headers = {**headers, **target.auth}
        try:
            response = await client.post(target.endpoint, call.path, data, headers, stream=call.stream)
        except Dropped as exc:
            if not exc.reused:
                raise
            # A kept-alive connection the engine closed as the request went out (its idle timeout): the
            # request was not read. Once more, on a new connection, before counting it as the replica's failure.
            counters.reconnects += 1
            response = await client.post(target.endpoint, call.path, data, headers, stream=call.stream)
        if response.status >= 500:
            detail = _error_message(await response.read())
            raise _Failure("status", ApiError(
                502, f"{where} answered {response.status}" + (f": {detail}" if detail else ""),
                code="upstream_error"), engine_error=ApiError(
                response.status, f"the engine answered {response.status} on {where} and on another replica"
                + (f": {detail}" if detail else ""), code="engine_error"))
        content_type = response.headers.get("content-type", "")
        if call.stream and response.status == 200 and content_type.startswith("text/event-stream"):
            rest = response.chunks()
            try:
                first = await anext(rest)
            except StopAsyncIteration:
                raise _Failure("stream", ApiError(502, f"{where} ended the stream before sending anything",
                                                  code="upstream_error")) from None
            return _Answer(response, ttft_ms=call.elapsed_ms(), first=first, rest=rest)
        ttft_ms = call.elapsed_ms()
        return _Answer(response, ttft_ms=ttft_ms, content=await response.read())
    except TimeoutError as exc:
        _close(response)
        raise _Failure("timeout", ApiError(504, f"{where} did not answer in time ({_describe(exc)})",
                                           code="upstream_timeout")) from None
    except UpstreamError as exc:
        _close(response)
        raise _Failure("connect", ApiError(502, f"{where} failed: {_describe(exc)}",
                                           code="upstream_error")) from None
    except BaseException:  # a _Failure above, or cancelled
        _close(response)
        raise


def _whole(call: Call, target: Target, answer: _Answer, usage: UsageRecorder) -> Response:
    response, content = answer.response, answer.content or b""
    tokens = _usage_of_json(content) if response.status == 200 else None
    call.answered(usage, response.status, target=target, ttft_ms=answer.ttft_ms, tokens=tokens)
    return Response(content, status_code=response.status,
                    media_type=response.headers.get("content-type", "application/json"))


class _Relay:
    """One stream from a replica to the client: event framing, usage, the end, and cleaning up."""

    def __init__(self, *, call: Call, lease: Lease, answer: _Answer, registry: Registry,
                 usage: UsageRecorder) -> None:
        self.call = call
        self.lease = lease  # released when the stream ends, however it ends
        self.target = lease.target
        self.answer = answer
        self.registry = registry
        self.usage = usage
        self.status = 200  # for usage: what became of the stream
        self.tokens: tuple[int, int] | None = None
        self.done = False  # `data: [DONE]` seen
        self.completed = False  # the whole stream (or an error event ending it) went to the client
        self.delivered = False  # `data: [DONE]` went to the client (the engine's end of the body may not have)
        self._finished = False
        self.events = self._events()

    async def _events(self) -> AsyncGenerator[bytes, None]:
        framer = _SseFramer()
        rest = self.answer.rest
        assert rest is not None
        try:
            chunk = self.answer.first
            while True:
                out = self._keep(framer.feed(chunk))
                if out:
                    yield out
                    # Resumed: the client has it. A client that leaves once it has [DONE] (the openai SDKs
                    # close the response there) got the whole answer, even if the engine's end is still due.
                    self.delivered = self.done
                try:
                    chunk = await anext(rest)
                except StopAsyncIteration:
                    break
            tail = framer.tail()
            if tail and tail.strip():
                out = self._keep([tail])
                if out:
                    yield out
            if not self.done:
                raise _Truncated
        except (UpstreamError, TimeoutError, _Truncated) as exc:
            yield self._fail(exc)
        self.completed = True

    def _keep(self, events: list[bytes]) -> bytes:
        kept: list[bytes] = []
        for event in events:
            if len(event) < 32 and b"[DONE]" in event:
                self.done = True
            elif b'"usage"' in event and _USAGE.search(event):  # the substring test first: most events have none
                data = _event_json(event)
                if isinstance(data, dict):
                    tokens = _tokens(data.get("usage"))
                    if tokens is not None:
                        self.tokens = tokens
                    if self.call.add_usage and data.get("choices") == []:
                        continue  # the usage chunk the gateway asked for, not the client
            elif _ERROR_EVENT.match(event):
                self.status = 502  # the engine reported an error in the stream
            kept.append(event)
        return kept[0] if len(kept) == 1 else b"".join(kept)

    def _fail(self, exc: Exception) -> bytes:
        where = f"replica {self.target.name} of {self.target.served_name!r}"
        if isinstance(exc, TimeoutError):
            self.status, kind, code = 504, "timeout", "upstream_timeout"
            message = f"{where} stopped sending in the middle of the stream ({_describe(exc)})"
        elif isinstance(exc, _Truncated):
            self.status, kind, code = 502, "stream", "upstream_error"
            message = f"{where} ended the stream before it was complete"
        else:
            self.status, kind, code = 502, "stream", "upstream_error"
            message = f"{where} failed in the middle of the stream: {_describe(exc)}"
        self.registry.failed(self.target, kind)
        body = json.dumps(error_body(self.status, message, code=code), separators=(",", ":"))
        return f"data: {body}\n\ndata: [DONE]\n\n".encode()

    async def finish(self) -> None:
        """Close the upstream response (the engine sees the disconnect), then record usage. Idempotent."""
        if self._finished:
            return
        self._finished = True
        with anyio.CancelScope(shield=True):
            await self.events.aclose()
            self.answer.response.close()  # mid-stream this drops the connection: the engine stops generating
        self.lease.release()
        status = self.status
        if not self.completed and not self.delivered:
            status = CLIENT_CLOSED
            self.registry.counters.client_disconnects += 1
        self.call.answered(self.usage, status, target=self.target, ttft_ms=self.answer.ttft_ms, tokens=self.tokens)


class RelayResponse(StreamingResponse):
    """A StreamingResponse that always closes its upstream when it ends, however it ends.

    A client disconnect stops the relay at once (_CancelOnDisconnect); the generator may then be left
    suspended, so the upstream response is closed here rather than left to the garbage collector.
    """

    def __init__(self, relay: _Relay) -> None:
        response = relay.answer.response
        super().__init__(relay.events, status_code=response.status,
                         media_type=response.headers.get("content-type", "text/event-stream"),
                         headers=_STREAM_RESPONSE_HEADERS)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with _CancelOnDisconnect(receive):
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self.relay.events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientGone:
            pass  # finish() records it
        finally:
            await self.relay.finish()


class _Truncated(Exception):
    """The upstream stream ended without `data: [DONE]`."""


class _SseFramer:
    """Splits a byte stream into complete SSE events (each with its blank-line terminator)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._pending + data if self._pending else data
        if b"\r" not in buffer:
            # The usual case, LF line ends: without CR the only terminator is LF LF, and split cuts exactly
            # where the regex's finditer would, at a fraction of the cost.
            pieces = buffer.split(b"\n\n")
            self._pending = pieces.pop()
            return [piece + b"\n\n" for piece in pieces]
        events: list[bytes] = []
        start = 0
        for end in _EVENT_END.finditer(buffer):
            events.append(buffer[start:end.end()])
            start = end.end()
        self._pending = buffer[start:]
        return events

    def tail(self) -> bytes:
        pending, self._pending = self._pending, b""
        return pending


def _event_json(event: bytes) -> Any:
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        return None


def _tokens(usage: object) -> tuple[int, int] | None:
    if not isinstance(usage, Mapping):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def _usage_of_json(content: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a JSON answer's top-level `usage`, if it has one."""
    if len(content) > _SMALL_JSON:
        # A big answer (embeddings): decode only the last `"usage": {...}`, which is where engines put it.
        at = content.rfind(b'"usage"')
        if at >= 0:
            match = _USAGE_KEY.match(content, at)
            if match is not None:
                try:
                    found, _ = json.JSONDecoder().raw_decode(content[match.end():].decode())
                except (ValueError, UnicodeDecodeError):
                    found = None
                tokens = _tokens(found)
                if tokens is not None:
                    return tokens
    try:
        data = json.loads(content)
    except ValueError:
        return None
    return _tokens(data.get("usage")) if isinstance(data, dict) else None


def _error_message(content: bytes) -> str:
    """The message of an engine's error answer (OpenAI shape, or FastAPI's `detail`), shortened."""
    try:
        data = json.loads(content)
    except ValueError:
        return content.decode(errors="replace").strip()[:300]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:300]
        if isinstance(data.get("detail"), str):
            return str(data["detail"])[:300]
    return json.dumps(data)[:300]


def _describe(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _close(response: UpstreamResponse | None) -> None:
    if response is not None:
        response.close()


async def _unless_gone(work: Coroutine[Any, Any, T], receive: Receive | None) -> T:
    """Await `work`, abandoning it (ClientGone) if the client disconnects first."""
    if receive is None:
        return await work
    async with _CancelOnDisconnect(receive):
        return await work  # cancelled, it closes what it opened (see _ask)


class _CancelOnDisconnect:
    """While entered, a client disconnect cancels the current task; leaving then raises ClientGone.

    The watcher (a task waiting on `receive`) starts only once the work has taken WATCH_AFTER_S: most answers
    come sooner, and a task per request was a seventh of the gateway's CPU at high load. A client gone
    before that is noticed then (`receive` reports a past disconnect at once). One task at most, instead of
    running the work in a task of its own beside the watcher (or Starlette's task group for streams)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._watching = False
        self._gone = False
        self._watch: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watching = True
        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start_watch)

    def _start_watch(self) -> None:
        if self._watching:
            self._watch = asyncio.ensure_future(_disconnected(self._receive))
            self._watch.add_done_callback(self._on_watch_done)

    def _on_watch_done(self, watch: asyncio.Task[None]) -> None:
        # `_watching`: a disconnect seen after leaving must not cancel whatever this task does next.
        if self._watching and not watch.cancelled() and watch.exception() is None:
            self._gone = True
            self._task.cancel()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._watching = False
        self._timer.cancel()
        if self._watch is not None:
            self._watch.cancel()
        if kind is not None and issubclass(kind, asyncio.CancelledError) and self._gone \
                and self._task.uncancel() == 0:  # our cancellation, not someone else's
            raise ClientGone from None


async def _disconnected(receive: Callable[[], Awaitable[Message]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
