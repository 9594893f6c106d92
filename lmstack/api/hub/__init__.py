"""`lmstack serve --workers N`: N server processes on one port, and what they must share.

The map:

1. `supervisor.run_workers` holds the port, opens the database, starts the controller (one per server:
   PostgreSQL's leader lock would let only one apply anyway, so the others would only poll Git) and the hub,
   then spawns N processes that each run the whole app under uvicorn on their own socket on that port
   (SO_REUSEPORT: the kernel spreads new connections over them). A process that dies is started again;
   SIGINT/SIGTERM stops them all, and the supervisor's death ends them (PR_SET_PDEATHSIG).
2. `server.Hub` runs in the supervisor, on its own thread and event loop, behind a Unix socket in a directory
   only this user can open. It holds what would be wrong if each process kept its own:
   - requests a minute per key, tokens a minute and a day per key, login attempts (services/ratelimit.py's
     classes, unchanged: a limit holds exactly across processes, not N times over);
   - the Prometheus series and the dashboard's traffic (services/metrics.Metrics: one set of counters, so
     /metrics and /api/traffic say the same whichever process answers);
   - the controller's poke, for the Git webhook;
   - the reads every process would otherwise make on its own: the Ready replicas and the re-check of the API
     keys in use. One query answers every process asking within a fraction of the refresh interval, so the
     database sees at most 2 replica reads per LMSTACK_REGISTRY_REFRESH_S and 4 key re-checks per
     LMSTACK_KEY_CACHE_S, whatever N is.
3. `client.HubClient` is each process's one connection to it. Records (a request answered, tokens used) are
   sent without waiting, gathered per event-loop turn into one write (7 us to send one); a limit check is
   one round trip (0.2 ms on a 2-core machine, where a bare Unix-socket round trip takes 0.05 ms), made
   only for a key that has that limit. `client.SharedLimits` and `client.SharedMetrics` put it behind the
   same interfaces the one-process server uses (services/limits.Limits,
   services/metrics.MetricsRecorder), so the gateway's code is the same in both.
   A process whose hub connection ends (the supervisor is gone) stops itself: nothing keeps serving with
   limits no one shares.

Why a process and a socket rather than shared memory or PostgreSQL: PostgreSQL would put a round trip to the
database on every limited request and make the limits fail with it; a shared-memory table would need its own
locking and a fixed layout, and would turn the exact sliding windows into per-second buckets. The hub keeps
the exact windows and the classes one process already uses, for one local round trip.

Still per process: requests in flight per replica (each process balances its own), a key's first look-up
(once per process per key in use), usage batches (each process writes its own every second), connections
per client address (each process takes 1/N of LMSTACK_MAX_CONNECTIONS_PER_IP), password checks at once (argon2's
memory is per process).
"""
