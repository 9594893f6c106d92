"""How lmstack reaches a worker's Docker: the only module that imports `paramiko`.

Over `ssh://` the client is the docker SDK's own transport (paramiko; each HTTP connection is an SSH
channel running `docker system dial-stdio` on the host) with the SDK's defaults replaced where they
would trust too much:

- host keys come only from the given known_hosts file (the SDK reads ~/.ssh/known_hosts); an unknown
  or changed key is an error, never added;
- only the given private key is offered (the SDK lets paramiko also try ssh-agent keys and
  ~/.ssh/id_*, and reads IdentityFile / ProxyCommand from ~/.ssh/config);
- the route (HostName, Port, User, ProxyCommand, ProxyJump) comes from the operator's ssh_config when
  one is set, as `ssh -G` reads it: Docker reaches the workers the way Ansible does. Nothing else from
  that file applies: host keys are still checked against the known_hosts file, and the last jump of a
  ProxyJump is run with the same strict options;
- connect, banner and auth timeouts are bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker  # type: ignore[import-untyped]
import docker.constants  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import docker.transport  # type: ignore[import-untyped]
import paramiko  # type: ignore[import-untyped]  # this is the one allowed place
import requests

from lmstack.nodes.docker.errors import ErrorKind, NodeError, clip

log = logging.getLogger(__name__)

# Errors of the connection itself (as opposed to Docker's answers).
TRANSPORT_ERRORS = OSError | EOFError | paramiko.SSHException  # a union: isinstance() and `|` take it
_ROUTE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SSHSettings:
    known_hosts: Path
    key: Path | None
    config: Path | None  # the operator's ssh_config (the route only), None: connect as the URL says
    connect_timeout_s: float
    channel_timeout_s: float


@dataclass(frozen=True)
class Endpoint:
    """The worker's address as the Docker URL gives it (ssh://user@host:port)."""
    host: str
    port: int
    user: str | None
    port_given: bool = True

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parsed = urllib.parse.urlparse(url)
        return cls(host=parsed.hostname or "", port=parsed.port or 22, user=parsed.username,
                   port_given=parsed.port is not None)

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}:{self.port}"


@dataclass(frozen=True)
class Route:
    """Where the SSH connection goes: the address to check the host key of, and, for ProxyCommand or
    ProxyJump, the command whose stdin and stdout carry the connection."""
    hostname: str
    port: int
    user: str | None
    proxy: tuple[str, ...] | None = None

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        via = " via a proxy command" if self.proxy else ""
        return f"{user}{self.hostname}:{self.port}{via}"


class RouteError(Exception):
    """The operator's ssh_config could not be read for this host (ssh -G failed)."""


def resolve_route(endpoint: Endpoint, settings: SSHSettings) -> Route:
    """The route to the endpoint: as given, or as `ssh -G -F CONFIG` resolves it (the URL's user and port
    win, as on ssh's command line)."""
    if settings.config is None:
        return Route(endpoint.host, endpoint.port, endpoint.user)
    ssh = shutil.which("ssh")
    if ssh is None:
        raise RouteError(f"an ssh_config ({settings.config}) is set, and reading it needs the OpenSSH client "
                         "(`ssh`), which is not on the PATH")
    argv = [ssh, "-G", "-F", str(settings.config)]
    if endpoint.port_given:
        argv += ["-p", str(endpoint.port)]
    if endpoint.user:
        argv += ["-l", endpoint.user]
    try:
        done = subprocess.run([*argv, "--", endpoint.host], capture_output=True, text=True,
                              timeout=_ROUTE_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RouteError(f"`ssh -G -F {settings.config}` did not answer within {_ROUTE_TIMEOUT_S:.0f}s") from exc
    if done.returncode != 0:
        raise RouteError(f"ssh could not read {settings.config} for {endpoint.host}: "
                         f"{clip(done.stderr) or f'exit status {done.returncode}'}")
    options: dict[str, str] = {}
    for line in done.stdout.splitlines():
        name, _, value = line.partition(" ")
        options.setdefault(name.lower(), value.strip())
    hostname = options.get("hostname") or endpoint.host
    port = int(options.get("port") or endpoint.port)
    user = options.get("user") or endpoint.user
    route = Route(hostname, port, user)
    command = options.get("proxycommand", "none")
    jump = options.get("proxyjump", "none")
    if command.lower() != "none":
        expanded = _expand(command, route, endpoint.host)
        return Route(hostname, port, user, ("/bin/sh", "-c", f"exec {expanded}"))
    if jump.lower() != "none":
        return Route(hostname, port, user, _jump_command(ssh, jump, route, settings))
    return route


def _expand(command: str, route: Route, original: str) -> str:
    """ProxyCommand's tokens (%h %p %r %n %%), shell-quoted: the host name comes from the repository."""
    values = {"h": route.hostname, "p": str(route.port), "r": route.user or "", "n": original}
    return re.sub(r"%([hprn%])", lambda m: "%" if m[1] == "%" else shlex.quote(values[m[1]]), command)


def _jump_command(ssh: str, jump: str, route: Route, settings: SSHSettings) -> tuple[str, ...]:
    """What ssh itself runs for ProxyJump A,B,...,Z: `ssh -J A,...,Y -W [host]:port Z`; with the host-key
    and key options pinned on the command line, where they win over the ssh_config."""
    hops = [hop.strip() for hop in jump.split(",") if hop.strip()]
    last = hops[-1]
    if "://" not in last and last.rsplit("@", 1)[-1].count(":") == 1:  # user@host:port is not a destination
        last = f"ssh://{last}"
    argv = [ssh, "-F", str(settings.config), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={settings.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"ConnectTimeout={max(1, round(settings.connect_timeout_s))}"]
    if settings.key is not None:
        argv += ["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-i", str(settings.key)]
    if len(hops) > 1:
        argv += ["-J", ",".join(hops[:-1])]
    argv += ["-W", f"[{route.hostname}]:{route.port}", "--", last]
    return tuple(argv)


class ProxyProcess:
    """A ProxyCommand/ProxyJump command whose stdin and stdout are one end of a socket pair; paramiko
    gets the other end as its socket. (paramiko's own ProxyCommand spins once the command exits and
    never reaps it; a real socket gives EOF and timeouts as usual.)"""

    def __init__(self, argv: tuple[str, ...]) -> None:
        ours, theirs = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  # lives as long as the process
        try:
            self.process = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=self._stderr,
                                            start_new_session=True, close_fds=True)
        except BaseException:
            ours.close()
            self._stderr.close()
            raise
        finally:
            theirs.close()
        self.sock = ours

    def stderr_text(self) -> str:
        """What the command said so far (its last lines), for error messages."""
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            return clip(self._stderr.read()[-2000:].decode(errors="replace"))
        return ""

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()


class ProxyFailedError(OSError):
    """The SSH connection through a proxy command failed; `detail` is what the command said."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _UnknownHostKeyError(Exception):
    def __init__(self, hostname: str, key: Any) -> None:
        super().__init__(f"no host key for {hostname} in known_hosts")
        self.hostname = hostname
        self.fingerprint = fingerprint(key)


class _RejectUnknownHost:
    """paramiko's missing-host-key policy (duck-typed): like its RejectPolicy, with an exception of our own."""

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        raise _UnknownHostKeyError(hostname, key)


class _StrictSSHAdapter(docker.transport.SSHHTTPAdapter):  # type: ignore[misc]
    """The SDK's SSH adapter with its paramiko client made strictly: host keys from our known_hosts file
    only (no ~/.ssh/known_hosts), unknown keys rejected, only our key offered (no agent, no ~/.ssh/id_*),
    the route from the operator's ssh_config only, bounded timeouts. The SDK's reconnect (when the
    transport is gone) goes through the same `_connect`, so it is just as strict."""

    def __init__(self, base_url: str, settings: SSHSettings, *, timeout: float, max_pool_size: int,
                 on_connect: Callable[[], None]) -> None:
        self._settings = settings
        self._on_connect = on_connect
        self._proxy: ProxyProcess | None = None
        self.route = resolve_route(Endpoint.parse(base_url), settings)
        super().__init__(base_url, timeout=timeout, pool_connections=1, max_pool_size=max_pool_size,
                         shell_out=False)

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        # The SDK keys its channel pools by the full URL (docker/docker-py#2966), so with one pool slot
        # every request to another container's URL dropped the open channels and ran a new
        # `docker system dial-stdio` on the worker. One key: channels are reused across requests.
        return super().get_connection("ssh://docker", proxies)

    def _create_paramiko_client(self, base_url: str) -> None:
        settings = self._settings
        client = paramiko.SSHClient()
        client.load_host_keys(str(settings.known_hosts))  # a missing file raises: never trust-on-first-use
        client.set_missing_host_key_policy(_RejectUnknownHost())
        self.ssh_client = client
        only_our_key = settings.key is not None
        self.ssh_params = {
            "hostname": self.route.hostname,
            "port": self.route.port,
            "username": self.route.user,
            "key_filename": str(settings.key) if settings.key is not None else None,
            "look_for_keys": not only_our_key,
            "allow_agent": not only_our_key,
            "timeout": settings.connect_timeout_s,
            "banner_timeout": settings.connect_timeout_s,
            "auth_timeout": settings.connect_timeout_s,
            "channel_timeout": settings.channel_timeout_s,
        }

    def _connect(self) -> None:
        self.stop_proxy()
        params = dict(self.ssh_params)
        if self.route.proxy is not None:
            self._proxy = ProxyProcess(self.route.proxy)
            params["sock"] = self._proxy.sock
        try:
            self.ssh_client.connect(**params)
        except BaseException as exc:
            self.ssh_client.close()  # the transport thread and socket of a refused connection
            proxy, said = self._proxy, self._proxy.stderr_text() if self._proxy is not None else ""
            self.stop_proxy()
            ours = isinstance(exc, paramiko.BadHostKeyException | paramiko.AuthenticationException)
            if proxy is not None and said and isinstance(exc, TRANSPORT_ERRORS) and not ours:
                raise ProxyFailedError(said) from exc
            raise
        self._on_connect()
        transport = self.ssh_client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)  # notice a dead peer between passes, not on the next call

    def stop_proxy(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None

    def close(self) -> None:
        super().close()
        self.stop_proxy()


@dataclass
class Connection:
    api: Any  # docker.APIClient
    ssh: Any  # paramiko.SSHClient, None for unix://
    sessions: threading.BoundedSemaphore
    dead: bool = False  # found not answering: replaced on next use

    def alive(self) -> bool:
        if self.ssh is None:
            return True
        transport = self.ssh.get_transport()
        return not self.dead and transport is not None and bool(transport.is_active())

    def responds(self, timeout_s: float) -> bool:
        """Whether the SSH connection answers now: a channel opens (and is closed again) within timeout_s."""
        if not self.alive():
            return False
        try:
            channel = self.ssh.get_transport().open_session(timeout=timeout_s)
        except Exception:
            return False
        channel.close()
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.api.close()  # closes the adapter, its channels, the SSH client and any proxy command
        if self.ssh is not None:
            with contextlib.suppress(Exception):
                self.ssh.close()


def connect(worker: str, url: str, settings: SSHSettings, *, timeout_s: float, max_sessions: int,
            on_handshake: Callable[[], None]) -> Connection:
    """A Docker API client for the worker, checked to answer; NodeError (with what to check) if not."""
    t0 = time.monotonic()
    sessions = threading.BoundedSemaphore(max_sessions)
    if urllib.parse.urlparse(url).scheme == "unix":
        try:
            api = docker.APIClient(base_url=url, version="auto", timeout=timeout_s, max_pool_size=max_sessions)
        except docker.errors.DockerException as exc:
            raise NodeError(kind="docker_unavailable", worker=worker, message=(
                f"{worker}: Docker does not answer at {url}: {clip(str(exc))}")) from exc
        return Connection(api=api, ssh=None, sessions=sessions)
    endpoint = Endpoint.parse(url)
    try:
        adapter = _StrictSSHAdapter(url, settings, timeout=timeout_s, max_pool_size=max_sessions,
                                    on_connect=on_handshake)
    except Exception as exc:
        error = connect_error(worker, endpoint, settings, exc)
        if error is None:
            raise
        raise error from exc
    # The SDK builds its own adapter from the URL; this one (strict host keys, one key) replaces it.
    # use_ssh_client=True keeps the SDK's from connecting: it would only start `ssh` on first use.
    api = docker.APIClient(base_url=url, version=docker.constants.DEFAULT_DOCKER_API_VERSION,
                           timeout=timeout_s, use_ssh_client=True, max_pool_size=max_sessions)
    api.mount("http+docker://ssh", adapter)
    api._custom_adapter = adapter
    conn = Connection(api=api, ssh=adapter.ssh_client, sessions=sessions)
    try:
        # What version="auto" does: speak the daemon's API version. Also the first proof that Docker
        # answers through `docker system dial-stdio` on the host.
        api._version = api.version(api_version=False)["ApiVersion"]
    except Exception as exc:
        detail = diagnose_docker(conn) if conn.alive() else ""
        conn.close()
        if not isinstance(exc, requests.RequestException | docker.errors.DockerException | KeyError
                          | TRANSPORT_ERRORS):
            raise
        if not detail:
            error = connect_error(worker, endpoint, settings, exc)
            if error is not None:
                raise error from exc
        raise NodeError(kind="docker_unavailable", worker=worker, message=(
            f"{worker}: SSH to {endpoint} works but Docker does not answer: {detail or clip(str(exc))}"
        )) from exc
    log.debug("%s: connected to Docker over SSH (%s, API %s) in %.2fs", worker, adapter.route, api._version,
              time.monotonic() - t0)
    return conn


def connect_error(worker: str, endpoint: Endpoint, ssh: SSHSettings, exc: BaseException) -> NodeError | None:
    if isinstance(exc, RouteError):
        return NodeError(kind="unreachable", worker=worker, message=f"{worker}: {exc}")
    if isinstance(exc, ProxyFailedError):
        kind: ErrorKind = "host_key" if "host key verification failed" in exc.detail.lower() else "unreachable"
        return NodeError(kind=kind, worker=worker, message=(
            f"{worker}: cannot connect over SSH to {endpoint} through the ProxyCommand/ProxyJump of "
            f"{ssh.config}: {exc.detail}"))
    if isinstance(exc, _UnknownHostKeyError):
        return NodeError(kind="host_key", worker=worker, message=(
            f"{worker}: the SSH host key of {exc.hostname} ({exc.fingerprint}) is not in {ssh.known_hosts}, and "
            "lmstack connects only to known hosts; check the key out of band, then add it (e.g. "
            f"ssh-keyscan -p {endpoint.port} {endpoint.host} >> {ssh.known_hosts})"))
    if isinstance(exc, paramiko.BadHostKeyException):
        return NodeError(kind="host_key", worker=worker, message=(
            f"{worker}: the SSH host key of {endpoint.host}:{endpoint.port} changed: it is now "
            f"{fingerprint(exc.key)}, {ssh.known_hosts} has {fingerprint(exc.expected_key)}. Someone may be "
            "intercepting the connection, or the host was reinstalled: verify the new key before you replace "
            "the entry"))
    if isinstance(exc, FileNotFoundError) and exc.filename in (str(ssh.known_hosts), str(ssh.key)):
        what = "known_hosts file" if exc.filename == str(ssh.known_hosts) else "SSH private key"
        return NodeError(kind="host_key" if what == "known_hosts file" else "auth_failed", worker=worker,
                         message=f"{worker}: the {what} {exc.filename} does not exist")
    if isinstance(exc, paramiko.PasswordRequiredException):
        return NodeError(kind="auth_failed", worker=worker, message=(
            f"{worker}: the SSH private key {ssh.key} is encrypted; lmstack needs a key without a passphrase"))
    if isinstance(exc, paramiko.AuthenticationException):
        key = f"the key {ssh.key}" if ssh.key is not None else "the ssh-agent and ~/.ssh keys"
        return NodeError(kind="auth_failed", worker=worker, message=(
            f"{worker}: {endpoint} refused {key} ({clip(str(exc))}); check that its public key is in that "
            "user's ~/.ssh/authorized_keys on the host and that the user name is right"))
    if isinstance(exc, TRANSPORT_ERRORS):
        reason = clip(str(exc)) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = "timed out"
        elif isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):  # refused / no route, per address
            reason = "; ".join(sorted({os.strerror(e.errno).lower() if e.errno else str(e)
                                       for e in exc.errors.values()}))
        return NodeError(kind="unreachable", worker=worker, message=(
            f"{worker}: cannot connect over SSH to {endpoint} ({reason}); check that the host is up, that sshd "
            "listens there and that the inventory's address and port are right"))
    return None


def diagnose_docker(conn: Connection) -> str:
    """Why Docker does not answer on a host SSH reaches: ask the docker CLI there (one extra session)."""
    try:
        _stdin, stdout, stderr = conn.ssh.exec_command("docker version --format '{{.Server.Version}}'",
                                                       timeout=15)
        out = stdout.read(2000).decode(errors="replace").strip()
        err = stderr.read(2000).decode(errors="replace").strip()
        status = stdout.channel.recv_exit_status()
    except Exception as exc:
        return f"asking the docker CLI on the host failed too ({clip(str(exc))})"
    if status == 127:
        return ("there is no `docker` command on the PATH of the SSH user (the connection runs "
                "`docker system dial-stdio` there); install Docker (lmstack prepare --install)")
    if status != 0:
        first = err.splitlines()[0] if err else f"exit status {status}"
        hint = ("add the SSH user to the docker group" if "permission denied" in err.lower()
                else "start it (systemctl start docker)")
        return f"the Docker daemon does not answer ({clip(first)}); {hint}"
    return f"the docker CLI reaches daemon {out}, but `docker system dial-stdio` did not answer"


def listening_ports(conn: Connection) -> set[int]:
    """TCP ports in LISTEN state on the host (its network namespace), from /proc/net/tcp{,6}: over SSH, or read
    here for a local Docker (unix://: the host is this machine, where engines share its network)."""
    if conn.ssh is None:
        text = ""
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                text += Path(table).read_text(errors="replace")
        return _listening(text)
    _stdin, stdout, _stderr = conn.ssh.exec_command("cat /proc/net/tcp /proc/net/tcp6 2>/dev/null",
                                                    timeout=15)
    text = stdout.read().decode(errors="replace")
    stdout.channel.recv_exit_status()
    return _listening(text)


def _listening(text: str) -> set[int]:
    ports = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:  # 0A: TCP_LISTEN
            with contextlib.suppress(ValueError):
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def fingerprint(key: Any) -> str:
    if key is None:
        return "no key of that type"
    try:
        return f"{key.get_name()} {key.fingerprint}"
    except Exception:
        return str(key.get_name())
