"""A stand-in inference engine: an OpenAI-compatible HTTP server, Python standard library only.

It runs inside the test bed's `lmstack-standin:test` image (see image.py) in place of vLLM, SGLang or
Ollama, so the whole lmstack path (placement, containers over SSH, readiness, gateway routing,
streaming) can be tested end to end without a GPU or a model. It takes the command-line shape of the
real engines and ignores the options it does not know, so a backend's generated command line works:

    standin.py [serve] [MODEL] [--model M | --model-path M] [--served-model-name NAME ...]
               [--host H] [--port P] [--startup-delay S] [--token-delay S] [--fail-health] [--api-key K]

Every option can also come from the environment (STANDIN_PORT, STANDIN_SERVED_MODEL_NAME, ...).
Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (also with "stream": true, and usage
when "stream_options": {"include_usage": true}), POST /v1/completions, POST /v1/embeddings,
GET /metrics (request counts, and the requests being answered as vLLM's `vllm:num_requests_running`),
GET /version. /health and /v1/models report the GPUs the container was given
(NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES). Every request is logged on stdout (for log tests).
SIGTERM and SIGINT stop it at once (a Python PID 1 would otherwise ignore SIGTERM).
With an API key (`--api-key`, or VLLM_API_KEY / LLAMA_API_KEY as the real engines read it), /v1/* answers
401 without `Authorization: Bearer <key>`, as vLLM does; /health, /metrics and /version stay open.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "0.1.0"
EMBEDDING_DIM = 16


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="standin", add_help=True, allow_abbrev=False)
    parser.add_argument("positional", nargs="*", help="[serve] [MODEL] (engine-style; ignored extras)")
    parser.add_argument("--model", "--model-path", dest="model", default=env("STANDIN_MODEL"))
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--host", default=env("STANDIN_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(env("STANDIN_PORT", "8000")))
    parser.add_argument("--startup-delay", type=float, default=float(env("STANDIN_STARTUP_DELAY", "0")),
                        help="seconds to wait before listening (an engine loading its model)")
    parser.add_argument("--token-delay", type=float, default=float(env("STANDIN_TOKEN_DELAY", "0.02")),
                        help="seconds between streamed chunks")
    parser.add_argument("--fail-health", action="store_true",
                        default=env("STANDIN_FAIL_HEALTH", "") not in ("", "0", "false"),
                        help="answer /health with 503 (an engine that never becomes ready)")
    parser.add_argument("--api-key", default=env("VLLM_API_KEY") or env("LLAMA_API_KEY") or None)
    args, unknown = parser.parse_known_args(argv)
    positional = [p for p in args.positional if p != "serve"]
    if args.model is None:
        args.model = positional[0] if positional else "standin-model"
    names = args.served_model_name
    if not names:
        from_env = env("STANDIN_SERVED_MODEL_NAME", "")
        names = from_env.split(",") if from_env else [args.model]
    args.served_model_names = [n for n in names if n]
    args.ignored = unknown
    return args


def visible_gpus() -> dict[str, object]:
    raw = {k: os.environ.get(k) for k in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")}
    value = raw["CUDA_VISIBLE_DEVICES"] or raw["NVIDIA_VISIBLE_DEVICES"] or ""
    devices = [] if value in ("", "void", "none") else [d.strip() for d in value.split(",") if d.strip()]
    return {"devices": devices, "env": raw}


def count_tokens(text: str) -> int:
    return max(1, len(text.split())) if text else 0


class Engine:
    """Answers deterministically: the reply names the model, the host and the prompt's size."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.hostname = socket.gethostname()
        self.started = time.time()
        self.requests: dict[str, int] = {}
        self.running = 0  # POST requests being answered now (vLLM's num_requests_running, for draining)
        self.lock = threading.Lock()

    def count(self, path: str) -> None:
        with self.lock:
            self.requests[path] = self.requests.get(path, 0) + 1

    def reply_words(self, prompt_tokens: int, max_tokens: int | None) -> list[str]:
        words = (f"Hello from {self.args.served_model_names[0]} on {self.hostname}: "
                 f"your prompt had {prompt_tokens} tokens.").split()
        words = [w if i == 0 else " " + w for i, w in enumerate(words)]
        if max_tokens is not None:
            words = words[:max(0, max_tokens)]
        return words

    def model_card(self, name: str) -> dict[str, object]:
        return {"id": name, "object": "model", "created": int(self.started), "owned_by": "lmstack-standin",
                "root": self.args.model, "parent": None, "max_model_len": 4096,
                "standin": {"hostname": self.hostname, "gpus": visible_gpus(), "pid": os.getpid()}}


def embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    vec = [(b - 127.5) / 127.5 for b in digest[:EMBEDDING_DIM]]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 6) for v in vec]


class Handler(BaseHTTPRequestHandler):
    server_version = "lmstack-standin/" + VERSION
    protocol_version = "HTTP/1.1"
    engine: Engine  # set on the subclass made in serve()

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"{self.address_string()} - {format % args}\n")
        sys.stdout.flush()

    # -- helpers ---------------------------------------------------------------------------------
    def send_json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status: int, message: str, kind: str = "BadRequestError",
              param: str | None = None) -> None:
        self.send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

    def read_json(self) -> dict[str, object] | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            self.error(400, "the request body is not valid JSON")
            return None
        if not isinstance(body, dict):
            self.error(400, "the request body must be a JSON object")
            return None
        return body

    def check_model(self, body: dict[str, object]) -> str | None:
        model = body.get("model")
        names = self.engine.args.served_model_names
        if model is None:
            return names[0]
        if model not in names:
            self.error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
            return None
        return str(model)

    def authorized(self, path: str) -> bool:
        key = self.engine.args.api_key
        if not key or not path.startswith("/v1/"):
            return True
        sent = self.headers.get("Authorization", "")
        if hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
            return True
        if self.command == "POST":  # the body is not read: the connection cannot be reused
            self.close_connection = True
        self.send_json(401, {"error": "Unauthorized"})
        return False

    # -- routes ----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        engine = self.engine
        path = self.path.split("?", 1)[0]
        engine.count(path)
        if not self.authorized(path):
            return
        if path == "/health":
            if engine.args.fail_health:
                self.error(503, "the engine is not ready", "ServiceUnavailableError")
                return
            self.send_json(200, {"status": "ok", "hostname": engine.hostname, "gpus": visible_gpus(),
                                 "models": engine.args.served_model_names,
                                 "uptime_s": round(time.time() - engine.started, 3)})
        elif path == "/v1/models":
            self.send_json(200, {"object": "list",
                                 "data": [engine.model_card(n) for n in engine.args.served_model_names]})
        elif path == "/version":
            self.send_json(200, {"version": VERSION, "engine": "lmstack-standin"})
        elif path == "/metrics":
            with engine.lock:
                counts = sorted(engine.requests.items())
                running = engine.running
            lines = [f'standin_requests_total{{path="{p}"}} {n}' for p, n in counts]
            # The gauges vLLM exports, by its names: what lmstack reads to know a drained replica is idle.
            name = engine.args.served_model_names[0]
            lines += [f'vllm:num_requests_running{{model_name="{name}"}} {float(running)}',
                      f'vllm:num_requests_waiting{{model_name="{name}"}} 0.0']
            data = ("\n".join(lines) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.error(404, f"no route for GET {path}", "NotFoundError")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        self.engine.count(path)
        if not self.authorized(path):
            return
        routes = {"/v1/chat/completions": self.chat, "/v1/completions": self.completions,
                  "/v1/embeddings": self.embeddings}
        route = routes.get(path)
        if route is None:
            self.error(404, f"no route for POST {path}", "NotFoundError")
            return
        body = self.read_json()
        if body is None:
            return
        model = self.check_model(body)
        if model is None:
            return
        with self.engine.lock:
            self.engine.running += 1
        try:
            route(body, model)
        finally:
            with self.engine.lock:
                self.engine.running -= 1

    def chat(self, body: dict[str, object], model: str) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            self.error(400, "'messages' must be a non-empty list", param="messages")
            return
        prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        self.generate(body, model, prompt, chat=True)

    def completions(self, body: dict[str, object], model: str) -> None:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = " ".join(str(p) for p in prompt)
        if not isinstance(prompt, str):
            self.error(400, "'prompt' must be a string or a list of strings", param="prompt")
            return
        self.generate(body, model, prompt, chat=False)

    def generate(self, body: dict[str, object], model: str, prompt: str, *, chat: bool) -> None:
        engine = self.engine
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        prompt_tokens = count_tokens(prompt)
        words = engine.reply_words(prompt_tokens, max_tokens if isinstance(max_tokens, int) else None)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        finish = "length" if isinstance(max_tokens, int) and max_tokens < len(engine.reply_words(0, None)) \
            else "stop"
        rid = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            text = "".join(words)
            choice: dict[str, object] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            self.send_json(200, {"id": rid, "object": kind, "created": created, "model": model,
                                 "choices": [choice], "usage": usage})
            return
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, object]], **extra: object) -> None:
            payload = {"id": rid, "object": chunk_kind, "created": created, "model": model,
                       "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                payload["usage"] = None
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        try:
            if chat:
                event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for word in words:
                time.sleep(engine.args.token_delay)
                delta: dict[str, object] = {"content": word} if chat else {}
                event([{"index": 0, **({"delta": delta} if chat else {"text": word}),
                        "finish_reason": None, "logprobs": None}])
            event([{"index": 0, **({"delta": {}} if chat else {"text": ""}), "finish_reason": finish,
                    "logprobs": None}])
            if include_usage:
                event([], usage=usage)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            sys.stdout.write("client went away during a stream\n")

    def embeddings(self, body: dict[str, object], model: str) -> None:
        given = body.get("input")
        inputs = given if isinstance(given, list) else [given]
        if not inputs or not all(isinstance(i, str) for i in inputs):
            self.error(400, "'input' must be a string or a list of strings", param="input")
            return
        tokens = sum(count_tokens(str(i)) for i in inputs)
        self.send_json(200, {"object": "list", "model": model,
                             "data": [{"object": "embedding", "index": n, "embedding": embedding(str(i))}
                                      for n, i in enumerate(inputs)],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(args: argparse.Namespace) -> Server:
    engine = Engine(args)
    handler = type("BoundHandler", (Handler,), {"engine": engine})
    return Server((args.host, args.port), handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def stop(signum: int, _frame: object) -> None:
        sys.stdout.write(f"standin: signal {signum}, stopping\n")
        sys.stdout.flush()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"standin {VERSION}: model {args.model} served as {args.served_model_names} "
          f"on {args.host}:{args.port}, gpus {visible_gpus()['devices']}, ignored args {args.ignored}",
          flush=True)
    if args.startup_delay > 0:
        time.sleep(args.startup_delay)
    server = make_server(args)
    print(f"standin: listening on {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


def _list_modules() -> None:
    """Exercise every route in-process, then print the files of all loaded modules (for image.py)."""
    import http.client

    server = make_server(parse_args(["--host", "127.0.0.1", "--port", "0", "--token-delay", "0", "--api-key", "k"]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    calls = [("GET", "/health", None), ("GET", "/v1/models", None), ("GET", "/metrics", None),
             ("GET", "/version", None), ("GET", "/nope", None), ("POST", "/v1/embeddings", {"input": "x"}),
             ("POST", "/v1/completions", {"prompt": "x"}), ("POST", "/v1/completions", "not json"),
             ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
             ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True,
                                               "stream_options": {"include_usage": True}})]
    for index, (method, path, body) in enumerate([*calls, ("GET", "/v1/models", None)]):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        data = json.dumps(body).encode() if isinstance(body, dict) else (body or "").encode()
        headers = {"Authorization": "Bearer k"} if index < len(calls) else {}  # the last one: a 401
        conn.request(method, path, body=data if method == "POST" else None, headers=headers)
        conn.getresponse().read()
        conn.close()
    server.shutdown()
    server.server_close()
    files = sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})
    print("\n".join(files))


if __name__ == "__main__":
    if sys.argv[1:] == ["--list-modules"]:
        _list_modules()
    else:
        sys.exit(main())
