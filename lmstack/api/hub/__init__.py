"""`lmstack serve --workers N`: N server processes on one port, and what they must share.

The map:

1. `supervisor.run_workers` binds the port once, opens the database, starts the controller (one per server:
   PostgreSQL's leader lock would let only one apply anyway, so the others would only poll Git) and the hub,
   then spawns N processes that each run the whole app under uvicorn on the shared socket. The kernel hands
   each new connection to one of them. A process that dies is started again; SIGINT/SIGTERM stops them all.
2. `server.Hub` runs in the supervisor, on its own thread and event loop, behind a Unix socket in a directory
   only this user can open. It holds what would be wrong if each process kept its own:
   - requests a minute per key, tokens a minute and a day per key, login attempts (services/ratelimit.py's
     classes, unchanged: a limit holds exactly across processes, not N times over);
   - the Prometheus series and the dashboard's traffic (services/metrics.Metrics: one set of counters, so
     /metrics and /api/traffic say the same whichever process answers);
   - the controller's poke, for the Git webhook.
3. `client.HubClient` is each process's one connection to it. Records (a request answered, tokens used) are
   sent without waiting, gathered per event-loop turn into one write; a limit check is one round trip
   (about 0.1 ms), made only for a key that has that limit. `client.SharedLimits` and `client.SharedMetrics`
   put it behind the same interfaces the one-process server uses (services/limits.Limits,
   services/metrics.MetricsRecorder), so the gateway's code is the same in both.
   A process whose hub connection ends (the supervisor is gone) stops itself: nothing keeps serving with
   limits no one shares.

Why a process and a socket rather than shared memory or PostgreSQL: PostgreSQL would put a round trip to the
database on every limited request and make the limits fail with it; a shared-memory table would need its own
locking and a fixed layout, and would turn the exact sliding windows into per-second buckets. The hub keeps
the exact windows and the classes one process already uses, for one local round trip.

Still per process: requests in flight per replica (each process balances its own), the key cache and the
registry's view of replicas (each process reads them from the database), connections per client address
(LMSTACK_MAX_CONNECTIONS_PER_IP is per process), password checks at once (argon2's memory is per process).
"""
