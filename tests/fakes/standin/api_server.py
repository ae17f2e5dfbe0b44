"""The API server: aiohttp, vLLM's OpenAI endpoints and development endpoints; requests go to
EngineCore, tokens come back one by one."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import itertools
import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import fakegpu
import setproctitle
from standin.common import (
    DEFAULT_MAX_TOKENS,
    describe_exit,
    env_float,
    fake_cuda_enabled,
    log,
    sleep_pauses_scheduler,
    start_child,
    vllm_version,
)
from standin.engine_core import PAUSE_MODES
from standin.model import (
    MAX_LOGPROBS,
    answer_key,
    detokenize,
    render_chat,
    tokenize,
)

# ---------------------------------------------------------------------------------------------------
# API server: aiohttp; requests go to EngineCore, tokens come back one by one.


# aiohttp.web, imported by run_api_server only: EngineCore and the workers start 0.3 s faster without it.
web = None


class EngineDeadError(Exception):
    """EngineCore is gone (or going, on shutdown): requests get a 500 with this message."""


@dataclass
class InFlight:
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False  # EngineCore took it into its batch (else it is waiting)


@dataclass(frozen=True)
class TokenOutput:
    """One step's output for a request: its text, why it finished (None: not yet) and its logprobs."""

    text: str
    finish_reason: str | None  # "length", "stop" (end-of-sequence) or "abort" (pause or sleep, mode abort)
    logprobs: list | None  # [[token, logprob], ...], the chosen token first

    @property
    def counts(self) -> bool:
        return self.finish_reason != "abort"  # an abort finishes a request without a token


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    stops_at_eos: bool
    logprobs: int | None  # top candidates per token the client asked for (None: no logprobs)


ENGINE_DEAD = object()  # queued to in-flight requests when EngineCore goes away


def error_response(status: int, message: str, error_type: str) -> object:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    return web.json_response(body, status=status)


class ApiServer:
    who = "APIServer"

    def __init__(self, args: argparse.Namespace, argv: list[str], started_at: float):
        self.args = args
        self.argv = argv
        self.started_at = started_at
        self.served_names: list[str] = args.served_model_name or [args.model]
        self.vllm_version = vllm_version()
        dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
        self.sleep_endpoints = args.enable_sleep_mode and dev_mode
        self.sleep_pauses_scheduler = sleep_pauses_scheduler(self.vllm_version)
        self.pause_endpoints = dev_mode and self.sleep_pauses_scheduler
        self.in_flight: dict[str, InFlight] = {}
        self.rpc_calls: dict[int, asyncio.Future] = {}
        self.rpc_ids = itertools.count(1)
        self.model_loaded = False
        self.shutting_down = False
        self.stop_reason = ""  # why requests can no longer be served, once they cannot
        self.exit_code = 0
        self.requests_total = 0
        self.aborted_requests_total = 0
        self.done = asyncio.Event()
        self.engine: subprocess.Popen | None = None
        self.engine_writer: asyncio.StreamWriter | None = None
        self.background: set[asyncio.Task] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_shutdown)
        if fake_cuda_enabled():
            fakegpu.register(os.getpid())  # vLLM's API server holds a CUDA context too
        self.engine, sock = start_child(self.argv, "engine")
        reader, self.engine_writer = await asyncio.open_unix_connection(sock=sock)
        self.spawn(self.read_engine(reader))
        runner = web.AppRunner(self.build_app(), access_log=None, handler_cancellation=True, shutdown_timeout=2)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.args.host, self.args.port).start()
        except OSError as error:
            log(self.who, "ERROR", f"cannot listen on {self.args.host}:{self.args.port}: {error}")
            self.request_shutdown()
            self.exit_code = 1
        else:
            log(self.who, "INFO", f"listening on http://{self.args.host}:{self.args.port}, loading the model")
        await self.done.wait()
        await self.stop_engine()
        await runner.cleanup()
        return self.exit_code

    def spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.background.discard)

    def request_shutdown(self) -> None:
        if not self.shutting_down:
            self.shutting_down = True
            self.stop_reason = self.stop_reason or "The server is shutting down"
            log(self.who, "INFO", "shutting down")
            self.fail_in_flight()
            self.done.set()

    async def stop_engine(self) -> None:
        engine = self.engine
        if engine is None or engine.poll() is not None:
            return
        engine.terminate()
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine.pid, signal.SIGCONT)  # a SIGSTOPped EngineCore must run to handle SIGTERM
        deadline = time.monotonic() + 3
        while engine.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if engine.poll() is None:
            engine.kill()
            engine.wait()

    async def read_engine(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, asyncio.IncompleteReadError):
                line = b""
            if not line:
                break
            self.on_engine_message(json.loads(line))
        await self.on_engine_gone()

    def on_engine_message(self, message: dict) -> None:
        op = message["op"]
        if op == "ready":
            self.spawn(self.finish_loading())
        elif op in ("started", "preempted"):
            if message["id"] in self.in_flight:
                self.in_flight[message["id"]].started = op == "started"
        elif op == "token":
            # A finished request leaves in_flight here, so whatever is still there when its handler
            # ends was cut short (client gone) and must be aborted in EngineCore.
            in_flight = self.in_flight.get(message["id"])
            if message["finish_reason"]:
                self.in_flight.pop(message["id"], None)
            if in_flight is not None:
                in_flight.tokens.put_nowait(TokenOutput(message["text"], message["finish_reason"], message["logprobs"]))
        elif op == "rpc_result":
            future = self.rpc_calls.get(message["call_id"])
            if future is not None and not future.done():
                future.set_result(message["result"])

    async def finish_loading(self) -> None:
        if os.environ.get("STANDIN_NEVER_READY") == "1":
            return
        startup_s = env_float("STANDIN_STARTUP_S", 0.3)
        await asyncio.sleep(max(0.0, self.started_at + startup_s - time.monotonic()))
        self.model_loaded = True
        print(f"standin: ready (pid {os.getpid()}) on http://{self.args.host}:{self.args.port}", flush=True)

    async def on_engine_gone(self) -> None:
        if self.shutting_down:
            return
        self.stop_reason = "Engine core died unexpectedly"
        deadline = time.monotonic() + 2
        while self.engine.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        how = describe_exit(self.engine.poll())
        log(self.who, "ERROR", f"Engine core died unexpectedly ({how}), shutting down the API server.")
        self.exit_code = 1
        self.request_shutdown()

    def fail_in_flight(self) -> None:
        for in_flight in self.in_flight.values():
            in_flight.tokens.put_nowait(ENGINE_DEAD)
        self.in_flight.clear()
        for future in self.rpc_calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(self.stop_reason))

    def send_to_engine(self, **message: object) -> None:
        if self.stop_reason:
            raise EngineDeadError(self.stop_reason)
        self.engine_writer.write(json.dumps(message).encode() + b"\n")

    # -- talking to EngineCore ------------------------------------------------------------------

    async def generate(self, key: str, sampling: Sampling):
        """Yields a TokenOutput per token. Closing it early aborts the request in EngineCore."""
        request_id = uuid.uuid4().hex
        in_flight = InFlight()
        self.send_to_engine(
            op="add",
            id=request_id,
            key=key,
            max_tokens=sampling.max_tokens,
            stops_at_eos=sampling.stops_at_eos,
            logprobs=sampling.logprobs,
        )
        self.in_flight[request_id] = in_flight
        self.requests_total += 1
        try:
            while True:
                item = await in_flight.tokens.get()
                if item is ENGINE_DEAD:
                    raise EngineDeadError(self.stop_reason)
                yield item
                if item.finish_reason:
                    return
        finally:
            if self.in_flight.pop(request_id, None) is not None:
                self.aborted_requests_total += 1
                log(self.who, "INFO", f"Aborted request {request_id}.")
                with contextlib.suppress(EngineDeadError):
                    self.send_to_engine(op="abort", id=request_id)

    async def engine_rpc(self, method: str, **params: object) -> dict:
        call_id = next(self.rpc_ids)
        future = asyncio.get_running_loop().create_future()
        self.rpc_calls[call_id] = future
        try:
            self.send_to_engine(op="rpc", call_id=call_id, method=method, params=params)
            return await future
        finally:
            self.rpc_calls.pop(call_id, None)

    # -- HTTP -------------------------------------------------------------------------------------

    def build_app(self):
        @web.middleware
        async def middleware(request, handler):
            return await self.log_and_shape_errors(request, handler)

        app = web.Application(middlewares=[middleware])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/version", self.version)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        if self.pause_endpoints:  # vLLM serves these only in dev mode, since 0.17 (rlhf/api_router.py)
            app.router.add_post("/pause", self.pause)
            app.router.add_post("/resume", self.resume)
            app.router.add_get("/is_paused", self.is_paused)
        if self.sleep_endpoints:  # vLLM serves these only in dev mode
            app.router.add_post("/sleep", self.sleep)
            app.router.add_post("/wake_up", self.wake_up)
            app.router.add_get("/is_sleeping", self.is_sleeping)
            app.router.add_post("/collective_rpc", self.empty_engine_rpc("collective_rpc"))
            app.router.add_post("/reset_prefix_cache", self.empty_engine_rpc("reset_prefix_cache"))
        return app

    async def log_and_shape_errors(self, request, handler):
        """Middleware: one access line per request, and vLLM's error bodies."""
        try:
            response = await handler(request)
        except web.HTTPException as error:
            if error.status not in (404, 405):
                self.log_access(request, error.status)
                raise
            response = web.json_response({"detail": error.reason}, status=error.status)  # FastAPI's shape
        except asyncio.CancelledError:
            self.log_access(request, 499)  # the client went away
            raise
        except EngineDeadError as error:
            response = error_response(500, str(error), "EngineDeadError")
        self.log_access(request, response.status)
        return response

    def log_access(self, request, status: int) -> None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Client Closed Request"
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = f"{peer[0]}:{peer[1]}" if peer else "-"
        path = request.path_qs
        print(f"({self.who} pid={os.getpid()}) INFO:     {client} - \"{request.method} {path} HTTP/1.1\" "
              f"{status} {phrase}", flush=True)  # fmt: skip

    def not_serving(self):
        """The error to answer with while the model is not usable, else None."""
        if self.stop_reason:
            return error_response(500, self.stop_reason, "EngineDeadError")
        if not self.model_loaded:
            return error_response(503, "The model is still loading", "ServiceUnavailableError")
        return None

    async def read_json(self, request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        return body if isinstance(body, dict) else None

    def unknown_model(self, body: dict):
        model = body.get("model")
        if model is None or model in self.served_names:
            return None
        return error_response(404, f"The model `{model}` does not exist.", "NotFoundError")

    async def accepted_body(self, request):
        """(JSON body, None) for a request to the model while it serves, else (None, the error to answer)."""
        problem = self.not_serving()
        if problem is not None:
            return None, problem
        body = await self.read_json(request)
        if body is None:
            return None, error_response(400, "Expected a JSON object", "BadRequestError")
        problem = self.unknown_model(body)
        return (None, problem) if problem is not None else (body, None)

    async def health(self, request):
        return web.Response(status=503 if self.stop_reason else 200)

    async def models(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        created = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": self.args.model,
                "parent": None,
                "max_model_len": self.args.max_model_len,
            }
            for name in self.served_names
        ]
        return web.json_response({"object": "list", "data": data})

    async def version(self, request):
        return web.json_response({"version": self.vllm_version})

    async def metrics(self, request):
        running = sum(1 for in_flight in self.in_flight.values() if in_flight.started)
        waiting = len(self.in_flight) - running
        label = f'{{model_name="{self.served_names[0]}"}}'
        # vLLM's gauges print as floats (prometheus_client); our own counters are plain integers.
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{label} {float(running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{label} {float(waiting)}\n"
            "# HELP standin:requests_total Generation requests handed to EngineCore.\n"
            "# TYPE standin:requests_total counter\n"
            f"standin:requests_total {self.requests_total}\n"
            "# HELP standin:aborted_requests_total Requests aborted because the client went away.\n"
            "# TYPE standin:aborted_requests_total counter\n"
            f"standin:aborted_requests_total {self.aborted_requests_total}\n"
        )
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def tokenize(self, request):
        body, problem = await self.accepted_body(request)
        if problem is not None:
            return problem
        if isinstance(body.get("messages"), list):
            text = render_chat(body["messages"])
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            return error_response(400, "Expected 'prompt' (a string) or 'messages'", "BadRequestError")
        tokens = tokenize(text)
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": self.args.max_model_len})

    async def detokenize(self, request):
        body, problem = await self.accepted_body(request)
        if problem is not None:
            return problem
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < 256 for t in tokens):
            return error_response(400, "Expected 'tokens': a list of token ids", "BadRequestError")
        return web.json_response({"prompt": detokenize(tokens)})

    async def chat_completions(self, request):
        return await self.completion_request(request, chat=True)

    async def completions(self, request):
        return await self.completion_request(request, chat=False)

    async def completion_request(self, request, chat: bool):
        body, problem = await self.accepted_body(request)
        if problem is not None:
            return problem
        if chat:
            prompt = body.get("messages")
            if not isinstance(prompt, list) or not prompt:
                return error_response(400, "'messages' must be a non-empty list", "BadRequestError")
            prompt_tokens = len(tokenize(render_chat(prompt)))
        else:
            prompt = body.get("prompt")
            if prompt is None:
                return error_response(400, "'prompt' is required", "BadRequestError")
            prompt_tokens = len(tokenize(prompt if isinstance(prompt, str) else json.dumps(prompt)))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return error_response(400, "max_tokens must be a positive integer", "BadRequestError")
        if prompt_tokens + max_tokens > self.args.max_model_len:
            message = (
                f"This model's maximum context length is {self.args.max_model_len} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion)."
            )
            return error_response(400, message, "BadRequestError")
        logprobs, problem = requested_logprobs(body, chat)
        if problem:
            return error_response(400, problem, "BadRequestError")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            return error_response(400, "ignore_eos must be a boolean", "BadRequestError")
        temperature = body.get("temperature")
        seed = body.get("seed")
        greedy = temperature == 0 or seed is not None  # vLLM's default temperature is 1.0: sampling
        key = answer_key("chat" if chat else "text", prompt, seed) if greedy else uuid.uuid4().hex
        reply = Reply(
            chat=chat,
            request_id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            model=body.get("model") or self.served_names[0],
            prompt_tokens=prompt_tokens,
            logprobs=logprobs,
        )
        # Only greedy answers stop at the end-of-sequence word, so sampled ones keep their length.
        tokens = self.generate(key, Sampling(max_tokens, greedy and not ignore_eos, logprobs))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self.stream_reply(request, reply, tokens, include_usage)
        async with contextlib.aclosing(tokens):
            outputs = [output async for output in tokens]
        return web.json_response(reply.full(outputs))

    async def stream_reply(self, request, reply: Reply, tokens, include_usage: bool):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send_event(payload: object) -> None:
            await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        try:
            async with contextlib.aclosing(tokens):
                if reply.chat:
                    await send_event(reply.chunk(None, role=True))
                async for output in tokens:
                    await send_event(reply.chunk(output))
            if include_usage:
                await send_event(reply.usage_chunk())
        except EngineDeadError as error:
            await send_event({"error": {"message": str(error), "type": "EngineDeadError", "code": 500}})
        except ConnectionResetError:
            return response  # the client went away; closing `tokens` aborted the request
        await response.write(b"data: [DONE]\n\n")
        return response

    async def pause(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        mode = request.query.get("mode", "abort")
        if mode not in PAUSE_MODES:  # FastAPI's validation error for a Literal query parameter
            message = "Input should be 'abort', 'wait' or 'keep'"
            detail = [{"type": "literal_error", "loc": ["query", "mode"], "msg": message, "input": mode}]
            return web.json_response({"detail": detail}, status=422)
        await self.engine_rpc("pause", mode=mode)
        return web.json_response({"status": "paused"})

    async def resume(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        await self.engine_rpc("resume")
        return web.json_response({"status": "resumed"})

    async def is_paused(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        return web.json_response(await self.engine_rpc("is_paused"))

    async def sleep(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        level = request.query.get("level", "1")
        if level not in ("0", "1", "2") or (level == "0" and not self.sleep_pauses_scheduler):
            return error_response(400, "level must be 1 or 2 (or 0: pause only, since vLLM 0.17)", "BadRequestError")
        if not self.sleep_pauses_scheduler:
            await self.engine_rpc("sleep", level=int(level))  # older vLLM: no mode, no pause
            return web.Response(status=200)
        mode = request.query.get("mode", "abort")  # vLLM 0.20.2: no mode means abort
        if mode not in PAUSE_MODES:  # vLLM raises in EngineCore: the request fails with a 500
            return error_response(500, f"Invalid pause mode: {mode}", "ValueError")
        await self.engine_rpc("sleep", level=int(level), mode=mode)
        return web.Response(status=200)

    async def wake_up(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        # A test may hold the wake-up back (weights being copied back) or make it fail, with a file.
        hold = Path(os.environ.get("STANDIN_WAKE_HOLD_FILE") or "/nonexistent")
        while hold.exists():
            if hold.read_text().strip() == "fail":
                return error_response(500, "wake_up failed (STANDIN_WAKE_HOLD_FILE)", "RuntimeError")
            await asyncio.sleep(0.02)
        await self.engine_rpc("wake_up")
        return web.Response(status=200)

    async def is_sleeping(self, request):
        problem = self.not_serving()
        if problem is not None:
            return problem
        return web.json_response(await self.engine_rpc("is_sleeping"))

    def empty_engine_rpc(self, method: str):
        async def handler(request):
            problem = self.not_serving()
            if problem is not None:
                return problem
            return web.json_response(await self.engine_rpc(method))

        return handler


def requested_logprobs(body: dict, chat: bool) -> tuple[int | None, str]:
    """How many candidates per token the request wants (None: no logprobs), or why it is invalid."""
    if chat:
        wanted, count = body.get("logprobs") or False, body.get("top_logprobs")
        if not isinstance(wanted, bool):
            return None, "logprobs must be a boolean"
        if count is not None and not wanted and count != 0:
            return None, "when using `top_logprobs`, `logprobs` must be set to true."
        if not wanted:
            return None, ""
        count = 0 if count is None else count
    else:
        count = body.get("logprobs")
        if count is None:
            return None, ""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_LOGPROBS:
        return None, f"logprobs must be an integer from 0 to {MAX_LOGPROBS}"
    return count, ""


@dataclass
class Reply:
    """The OpenAI response shapes of one chat or text completion."""

    chat: bool
    request_id: str
    model: str
    prompt_tokens: int
    logprobs: int | None = None  # candidates per token to report (None: no logprobs)
    completion_tokens: int = 0
    text_offset: int = 0  # where the next token starts in the completion's text
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, object_kind: str, choices: list) -> dict:
        return {"id": self.request_id, "object": object_kind, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def logprobs_of(self, outputs: list[TokenOutput]) -> dict | None:
        """vLLM's logprobs of these tokens: the legacy completions shape, or the chat shape."""
        if self.logprobs is None:
            return None
        outputs = [output for output in outputs if output.counts]
        if self.chat:
            return {"content": [chat_logprob(output.logprobs, self.logprobs) for output in outputs]}
        shape = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for output in outputs:
            (token, logprob), *_ = output.logprobs
            shape["tokens"].append(token)
            shape["token_logprobs"].append(logprob)
            # vLLM lists the top candidates and the sampled token (here the same, greedy picks the top).
            shape["top_logprobs"].append(dict(output.logprobs[: max(self.logprobs, 1)]))
            shape["text_offset"].append(self.text_offset)
            self.text_offset += len(output.text)
        return shape

    def full(self, outputs: list[TokenOutput]) -> dict:
        self.completion_tokens = sum(1 for output in outputs if output.counts)
        text = "".join(output.text for output in outputs)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text}
            kind = "text_completion"
        finish_reason = outputs[-1].finish_reason if outputs else "length"
        choice.update(logprobs=self.logprobs_of(outputs), finish_reason=finish_reason, stop_reason=None)
        return {**self.envelope(kind, [choice]), "usage": self.usage()}

    def chunk(self, output: TokenOutput | None, role: bool = False) -> dict:
        """One streamed event: the assistant role first (chat), then one per token output."""
        if output is None:
            output = TokenOutput("", None, None)
        if output.counts and not role:
            self.completion_tokens += 1
        logprobs = self.logprobs_of([output]) if output.counts and not role else None
        if self.chat:
            delta = {"role": "assistant", "content": output.text} if role else {"content": output.text}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": output.finish_reason}
            return self.envelope("chat.completion.chunk", [choice])
        choice = {
            "index": 0,
            "text": output.text,
            "logprobs": logprobs,
            "finish_reason": output.finish_reason,
            "stop_reason": None,
        }
        return self.envelope("text_completion", [choice])

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.envelope(kind, []), "usage": self.usage()}


def chat_logprob(candidates: list, top: int) -> dict:
    """One token of the chat completions logprobs shape."""

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {**entry(*candidates[0]), "top_logprobs": [entry(*candidate) for candidate in candidates[:top]]}


def run_api_server(args: argparse.Namespace, argv: list[str]) -> int:
    global web
    from aiohttp import web

    started_at = time.monotonic()
    # Tools find vLLM by its command line; this is the one `python3 -m vllm.entrypoints...` shows.
    # Real vLLM never retitles its API server, so its /proc/PID/environ stays readable (cuda-toggle-all
    # checks the NCCL settings there); SPT_NOENV keeps setproctitle from overwriting it here too. It is
    # dropped again at once so EngineCore and the workers clobber theirs, as vLLM's do.
    os.environ["SPT_NOENV"] = "1"
    setproctitle.setproctitle(" ".join(["python3", "-m", "vllm.entrypoints.openai.api_server", *argv]))
    del os.environ["SPT_NOENV"]

    async def serve() -> int:
        return await ApiServer(args, argv, started_at).serve()  # its asyncio objects need the running loop

    return asyncio.run(serve())
