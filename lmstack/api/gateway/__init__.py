"""The OpenAI-compatible gateway: one request from the socket to an engine and back.

1. uvicorn reads the request off the socket (httptools) and calls the app (`api.app._App`). A POST to
   /v1/chat/completions, /v1/completions or /v1/embeddings goes straight to `routes.gateway.answer_fast`,
   ahead of FastAPI's middleware, routing and dependencies, which cost more CPU per request than the proxying
   does (bench/gateway_overhead.py --profile). FastAPI's own routes for those paths answer with the same
   function, so both ways in are one code path.
2. Who asks: `deps.principal_for` checks the Bearer token, an API key (`services.keys.KeyCache.verify`: from
   memory, re-checked in the background twice a second, trusted through a database outage for a while) or
   a login token (its user's role from the same cache). Nothing here waits on the database.
3. What is asked: `inputs.read_body` (size limit), then `routes.gateway.proxy_request`: the JSON body and its
   `model`, the key's model allowlist (403), the model known (404), the key's token limits and requests a
   minute (429 with Retry-After, `services.limits`: kept in this process, or, when the server runs several, in
   the supervisor's hub, one round trip over a Unix socket: api/hub). The request becomes a `proxy.Call`.
4. Where to: `proxy.forward` takes the prompt's keys (`affinity.prompt_keys`, long prompts only) and asks
   `registry.Registry.pick` for a Ready replica: the one that served the prompt's beginning lately, within a
   bounded share of the load, else power of two choices on requests in flight; suspect replicas and those on
   a worker the controller could not reach only when nothing else is left. A `proxy.Lease` counts the
   request in that replica's requests in flight until its answer ends.
5. To the engine: `proxy._ask` sends it with `upstream.UpstreamClient` (a kept-alive connection per engine,
   TCP keepalive so a host that goes away is noticed in seconds) and reads the status line, and for a stream
   the first event, before answering anything. A failure until then (connection, timeout, 5xx, empty stream)
   is still the gateway's to handle: the request goes once to another replica (back to 4); a 5xx that the
   second replica gives too is the request's and is relayed as the engine's.
6. Back to the client: a whole answer is read and sent (`proxy._whole`); a stream is relayed event by event
   (`proxy._Relay`, `proxy.RelayResponse`), the usage chunk the gateway asked for taken out, the engine's
   connection closed as soon as the client leaves (the engine stops generating).
7. What it cost: `proxy.Call.answered` records each request once, however it ended, with
   `services.usage.UsageRecorder` (buffered, written every second; it also feeds `services.metrics` — the
   Prometheus series and the dashboard's traffic — and the token limits).

The registry re-reads the Ready replicas from PostgreSQL every `LMSTACK_REGISTRY_REFRESH_S` off the request
path (through the supervisor's one read when the server runs several processes: api/hub); what it learns
while serving (requests in flight, failures) stays in memory, per process.
"""
