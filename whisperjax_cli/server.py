"""``wjx serve``: an OpenAI-compatible transcription server (Starlette on uvicorn).

Routes: ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` (OpenAI's multipart
fields and response formats, :mod:`~whisperjax_cli.server_protocol`), ``GET /v1/models``,
``GET /v1/models/{id}`` and ``GET /health``. One model, loaded and compiled once, serves every
request through one :class:`~whisperjax_cli.server_scheduler.Scheduler` thread, so concurrent
requests share decode batches (continuous batching).

A request, in order: the API key (401), a place in the queue (503 when ``max_queue`` requests
are already in), the upload streamed to a private folder (413 past ``max_upload_mb``, 408 when
it takes longer than the deadline), the fields (400), then the transcription itself (400 for
audio that cannot be decoded, 504 when ``request_timeout`` passes: its work is dropped). The
upload is removed when the request ends, however it ends. Nothing from a request is executed
or unpickled: the audio goes to libsndfile or ffmpeg, the fields are parsed as text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from whisperjax_cli.errors import AudioError, UsageError
from whisperjax_cli.options import MAX_BATCH, TranscribeOptions
from whisperjax_cli.server_protocol import ApiError, RequestParams, delta_events, done_event, parse_params, render, sse
from whisperjax_cli.server_scheduler import Dropped, Job, Scheduler
from whisperjax_cli.server_upload import Upload, read_upload

LOG = logging.getLogger("wjx.serve")
CLIENT_GONE = 499  # nginx's status for a client that closed the connection (never seen by it)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The server's limits and settings (``wjx serve``'s flags)."""

    api_key: Optional[str] = None  # clients send "Authorization: Bearer <key>"; None: no check
    max_upload_mb: float = 25.0  # OpenAI's limit
    max_queue: int = 32  # requests in the server at once (uploading, waiting or decoding)
    request_timeout: float = 600.0  # seconds from arrival to answer; past it the work is dropped
    shutdown_timeout: float = 30.0  # on SIGTERM, seconds for in-flight requests to finish
    batch_size: int = 8  # windows decoded together

    def __post_init__(self):
        checks = (("--max-upload-mb", self.max_upload_mb, 0), ("--max-queue", self.max_queue, 1),
                  ("--request-timeout", self.request_timeout, 0), ("--shutdown-timeout", self.shutdown_timeout, 0),
                  ("--batch-size", self.batch_size, 1))
        for flag, value, low in checks:
            if not value >= low or (low == 0 and value == 0):  # "not >=" catches NaN too
                raise UsageError(flag, f"must be {'> 0' if low == 0 else '>= 1'}, not {value}")
        if self.batch_size > MAX_BATCH:
            raise UsageError("--batch-size", f"must be at most {MAX_BATCH}, not {self.batch_size}")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key", "must not be empty")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))


class Service:
    """The routes, and what they share: model, scheduler, upload folder, requests in flight."""

    def __init__(self, model, config: ServerConfig):
        self.model, self.config = model, config
        self.base_options = TranscribeOptions.create(batch_size=config.batch_size)
        self.scheduler: Optional[Scheduler] = None
        self.folder: Optional[Path] = None
        self.in_flight = 0  # requests admitted and not answered (touched on the event loop only)
        self.created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """Private upload folder and scheduler for the server's life; on shutdown (after
        uvicorn has let in-flight requests finish) the scheduler drains and the folder goes."""
        self.folder = Path(tempfile.mkdtemp(prefix="wjx-serve-"))  # mode 0700
        self.scheduler = Scheduler(self.model)
        self.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.scheduler.close, self.config.shutdown_timeout)
            shutil.rmtree(self.folder, ignore_errors=True)

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model_info, methods=["GET"]),
            Route("/v1/audio/transcriptions", self.transcriptions, methods=["POST"]),
            Route("/v1/audio/translations", self.translations, methods=["POST"]),
        ]

    # ------------------------------------------------------------ small routes

    async def health(self, request: Request) -> Response:
        s = self.scheduler
        return JSONResponse({"status": "ok", "model": self.model.name, "in_flight": self.in_flight,
                             "queued": s.queued if s else 0, "decoding": s.active if s else 0})

    def _model_card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "wjx"}

    def _model_ids(self) -> list[str]:
        return list(dict.fromkeys([self.model.name, "whisper-1"]))

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card(m) for m in self._model_ids()]})

    async def model_info(self, request: Request) -> Response:
        self._authorize(request)
        model_id = request.path_params["model_id"]
        if model_id not in self._model_ids():
            raise ApiError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(self._model_card(model_id))

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        challenge = {"WWW-Authenticate": "Bearer"}
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "no API key: send 'Authorization: Bearer <key>'", headers=challenge)
        # Constant time: how long the comparison takes says nothing about how much of it matched.
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key", headers=challenge)

    # ------------------------------------------------------------ audio

    async def transcriptions(self, request: Request) -> Response:
        return await self._audio(request, "transcribe")

    async def translations(self, request: Request) -> Response:
        return await self._audio(request, "translate")

    async def _audio(self, request: Request, task: str) -> Response:
        deadline = time.monotonic() + self.config.request_timeout
        self._authorize(request)
        if self.in_flight >= self.config.max_queue:
            raise ApiError(503, f"the server is busy ({self.in_flight} requests in progress); retry later",
                           type="server_error", code="queue_full", headers={"Retry-After": "1"})
        self.in_flight += 1
        request_state = _RequestState(self)
        try:
            request_state.upload = upload = await self._read(request, deadline)
            if upload.path is None:
                raise ApiError(400, "no audio: send it in the multipart field 'file'", param="file")
            if upload.refers_to_other_files():
                raise ApiError(400, "playlists and manifests are not accepted: send the audio itself",
                               param="file", code="invalid_file")
            params = parse_params(upload.fields, task, self.model.tokenizer, self.base_options)
            messages = request_state.submit(params.options, deadline)
            if params.stream:
                first = await self._next(request_state, messages, deadline, request)
                if first[0] == "error":
                    raise self._job_error(first[1], upload, deadline)
                return request_state.hand_over(_EventStream(
                    self._events(request_state, messages, first, params, deadline), request_state.close))
            while True:
                kind, value = await self._next(request_state, messages, deadline, request)
                if kind == "error":
                    raise self._job_error(value, upload, deadline)
                if kind == "done":
                    request_state.finished = True
                    body, media_type = render(value, params)
                    return Response(body, media_type=media_type)
        finally:
            request_state.close()

    async def _read(self, request: Request, deadline: float) -> Upload:
        length = request.headers.get("content-length")
        try:
            return await asyncio.wait_for(
                read_upload(request.stream(), request.headers.get("content-type", ""),
                            int(length) if length and length.isdigit() else None,
                            self.folder, self.config.max_upload_bytes),
                timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(408, "the upload took longer than this server's request timeout",
                           code="request_timeout") from None
        except ClientDisconnect:
            raise ApiError(CLIENT_GONE, "the client closed the connection during the upload") from None

    async def _next(self, state: "_RequestState", messages: asyncio.Queue, deadline: float,
                    request: Optional[Request]) -> tuple[str, Any]:
        """The scheduler's next message for this request; 504 past the deadline. While it
        waits, a client that went away has its work dropped (checked once a second)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                state.cancel()
                raise ApiError(504, "transcription did not finish within this server's request timeout",
                               type="server_error", code="timeout")
            try:
                return await asyncio.wait_for(messages.get(), timeout=min(left, 1.0))
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    state.cancel()
                    raise ApiError(CLIENT_GONE, "the client closed the connection") from None

    async def _events(self, state: "_RequestState", messages: asyncio.Queue, first: tuple[str, Any],
                      params: RequestParams, deadline: float):
        """The SSE body: a delta per segment as decoded, then ``transcript.text.done`` (or an
        error object, which the openai client raises as an APIError)."""
        kind, value = first
        started = False
        try:
            while True:
                if kind == "segments":
                    for event in delta_events(value, first=not started):
                        yield event
                    started = True
                elif kind == "done":
                    state.finished = True
                    yield done_event(value, params)
                    return
                else:
                    yield sse(self._job_error(value, state.upload, deadline).body())
                    return
                kind, value = await self._next(state, messages, deadline, None)
        except ApiError as err:
            yield sse(err.body())
        finally:
            state.close(final=True)

    def _job_error(self, err: BaseException, upload: Upload, deadline: float) -> ApiError:
        """The answer for a failed job: bad audio is the client's (400), the rest the server's."""
        if isinstance(err, AudioError):
            message = err.message.replace(f"file:{upload.path}", upload.filename).replace(str(upload.path),
                                                                                          upload.filename)
            return ApiError(400, f"could not decode the audio file: {message}", param="file", code="invalid_file")
        if isinstance(err, UsageError):
            return ApiError(400, err.message, code="invalid_value")
        if isinstance(err, Dropped):
            if time.monotonic() >= deadline:
                return ApiError(504, "transcription did not finish within this server's request timeout",
                                type="server_error", code="timeout")
            return ApiError(503, f"the request was dropped: {err}", type="server_error", code="unavailable")
        LOG.error("transcription failed: %s: %s", type(err).__name__, err)
        return ApiError(500, f"transcription failed ({type(err).__name__})", type="server_error")


class _RequestState:
    """What one audio request holds, released exactly once: its place, its upload, its job."""

    def __init__(self, service: Service):
        self.service = service
        self.upload: Optional[Upload] = None
        self.job: Optional[Job] = None
        self.finished = False  # the job ended with a transcript
        self._handed_over = False  # a streaming response releases it when the stream ends
        self._closed = False

    def submit(self, options: TranscribeOptions, deadline: float) -> asyncio.Queue:
        """Queues the job; returns the queue its scheduler messages arrive on (this loop)."""
        loop, messages = asyncio.get_running_loop(), asyncio.Queue()
        self.job = Job(options, str(self.upload.path), deadline,
                       lambda kind, value: loop.call_soon_threadsafe(messages.put_nowait, (kind, value)))
        try:
            self.service.scheduler.submit(self.job)
        except Dropped:
            self.job = None
            raise ApiError(503, "the server is shutting down", type="server_error", code="unavailable") from None
        return messages

    def cancel(self) -> None:
        if self.job is not None and not self.finished:
            self.service.scheduler.cancel(self.job)

    def hand_over(self, response: Response) -> Response:
        """Leaves the release to ``response`` (a stream, which releases it when it ends)."""
        self._handed_over = True
        return response

    def close(self, final: bool = False) -> None:
        """Releases the request: from the handler's ``finally`` unless handed over, else
        when the stream ends (``final``)."""
        if self._closed or (self._handed_over and not final):
            return
        self._closed = True
        self.cancel()
        if self.upload is not None:
            self.upload.remove()
        self.service.in_flight -= 1


class _EventStream(StreamingResponse):
    """Server-sent events that release their request however the response ends: sent,
    failed, or cancelled before the body started (when the generator's own ``finally`` never runs)."""

    def __init__(self, events, release):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release(final=True)


def _error_response(err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error(request: Request, err: ApiError) -> Response:
    return _error_response(err)


async def _http_error(request: Request, err: HTTPException) -> Response:
    return _error_response(ApiError(err.status_code, str(err.detail), headers=err.headers))


async def _server_error(request: Request, err: Exception) -> Response:
    LOG.exception("unexpected error")
    return _error_response(ApiError(500, "internal server error", type="server_error"))


def create_app(model, config: Optional[ServerConfig] = None) -> Starlette:
    """The ASGI app serving ``model`` (a loaded :class:`~whisperjax_cli.loading.WhisperModel`)."""
    service = Service(model, config or ServerConfig())
    app = Starlette(routes=service.routes(), lifespan=service.lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.service = service
    return app


def make_server(model, config: Optional[ServerConfig] = None, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info"):
    """A ``uvicorn.Server`` for :func:`create_app`: ``.run()`` serves until SIGTERM or Ctrl-C,
    then stops accepting, gives in-flight requests ``shutdown_timeout`` seconds, and drains."""
    import uvicorn

    config = config or ServerConfig()
    app = create_app(model, config)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                         timeout_graceful_shutdown=config.shutdown_timeout, server_header=False))
