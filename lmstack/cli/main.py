"""The `lmstack` command line."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from lmstack import __version__
from lmstack.backends import effective_spec, spec_hash
from lmstack.cli.render import (
    plan_document,
    plan_reach,
    render_commands,
    render_observation,
    render_orphans,
    render_plan,
    render_status,
)
from lmstack.cli.render_facts import render_facts
from lmstack.cli.scaffold import ScaffoldError, scaffold
from lmstack.cli.up import down as down_command
from lmstack.cli.up import up as up_command
from lmstack.cli.users import keys_app, users_app
from lmstack.config import Settings, SshFiles, SshFilesError, ssh_files
from lmstack.gitsource import Source, SourceError, init_repository, load_source, parse_snapshot, read_commit
from lmstack.gitsource.source import push_limits
from lmstack.manifests import ManifestValidationError, json_schema
from lmstack.nodes.docker import DockerSetupError as NodeSetupError
from lmstack.reconcile.apply import Survey, apply_source, plan_source
from lmstack.reconcile.backoff import hold_back
from lmstack.reconcile.facts import FactsError, gather_facts
from lmstack.reconcile.leader import Holder, lead
from lmstack.reconcile.model import Action, ActionKind, Plan
from lmstack.reconcile.status import fleet_status
from lmstack.state import DatabaseError, current_revision, downgrade, head_revision, open_database, upgrade

app = typer.Typer(
    name="lmstack",
    help="Run LLMs on your own GPU machines: manifests in Git, applied over SSH, one OpenAI-compatible endpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The state database (PostgreSQL; embedded when LMSTACK_DATABASE_URL is unset).",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.command()(up_command)
app.command()(down_command)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

RepoOption = Annotated[str, typer.Option(
    "--repo", envvar="LMSTACK_REPO", show_default=True,
    help="Git repository to read: a path or a URL (file://, ssh://, https://). Reads the commit, not the "
         "working tree.")]
RefOption = Annotated[str, typer.Option("--ref", envvar="LMSTACK_REF", help="Branch, tag or commit SHA.")]
DirOption = Annotated[Path | None, typer.Option(
    "--dir", file_okay=False, help="Read a plain folder instead of a commit (includes uncommitted edits).")]
SshKeyOption = Annotated[Path | None, typer.Option(
    "--ssh-key", envvar="LMSTACK_SSH_KEY", dir_okay=False,
    help="Private key for SSH to the workers (default: ~/.ssh/id_ed25519, else ~/.ssh/id_rsa).")]
KnownHostsOption = Annotated[Path | None, typer.Option(
    "--known-hosts", envvar="LMSTACK_KNOWN_HOSTS", dir_okay=False,
    help="The workers' host keys; hosts not in it are refused (default: ~/.ssh/known_hosts).")]


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


def _source(repo: str, ref: str, directory: Path | None, settings: Settings) -> Source:
    try:
        return load_source(repo=None if directory else repo, ref=ref, directory=directory, settings=settings)
    except ManifestValidationError as exc:
        for error in exc.errors:
            err.print(str(error), highlight=False, markup=False)
        count = len(exc.errors)
        _fail(f"{count} error{'s' if count != 1 else ''} in the manifests; nothing was planned or applied")
    except SourceError as exc:
        _fail(str(exc))


def _describe(source: Source) -> str:
    if source.revision is None:
        return f"{source.origin} (folder, uncommitted files included)"
    return f"{source.origin} @ {source.revision.sha[:12]} \"{source.revision.subject}\""


@app.callback(invoke_without_command=True)
def main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        out.print(f"lmstack {__version__}")
        raise typer.Exit()


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="New folder for the manifests repository.")]) -> None:
    """Create a manifests repository: example inventory, two workers, one deployment, and a first commit."""
    try:
        written = scaffold(directory)
    except ScaffoldError as exc:
        _fail(str(exc))
    sha = init_repository(directory, "lmstack init: example inventory, workers and deployment")
    for path in written:
        out.print(f"  created {path}")
    out.print(f"Initialised a git repository in {directory} (commit {sha[:12]}).")
    out.print("Next: edit inventory/hosts.ini and manifests/, commit, then run "
              f"`lmstack plan --repo {directory}`.")


@app.command()
def validate(repo: RepoOption = ".", ref: RefOption = "HEAD", directory: DirOption = None) -> None:
    """Check every manifest and the inventory; print all errors as FILE:LINE: key.path: message (exit 1)."""
    source = _source(repo, ref, directory, Settings())
    desired = source.desired
    out.print(f"{_describe(source)}: {len(desired.workers)} workers, {len(desired.deployments)} deployments, "
              f"{len(source.inventory.hosts)} inventory hosts. Valid.")


PruneOption = Annotated[bool | None, typer.Option(
    "--prune/--no-prune", show_default=False,
    help="Delete the replicas of deployments removed from the manifests [default: LMSTACK_PRUNE, true].")]


@app.command()
def plan(
    repo: RepoOption = ".",
    ref: RefOption = "HEAD",
    directory: DirOption = None,
    ssh_key: SshKeyOption = None,
    known_hosts: KnownHostsOption = None,
    offline: Annotated[bool, typer.Option(
        "--offline", help="Do not observe the containers over SSH: plan on the recorded status alone.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    show_unchanged: Annotated[bool, typer.Option("--show-unchanged", help="List unchanged replicas too.")] = False,
    show_commands: Annotated[bool, typer.Option(
        "--show-commands", help="Print the `docker run` equivalent of each container to be created.")] = False,
    prune: PruneOption = None,
) -> None:
    """Show what would change on which machine and why, on the stored facts and the containers as they are
    now (observed over SSH, as apply does; nothing is changed). Exit 0: no changes; 2: changes; 1: error."""
    settings = Settings()
    source = _source(repo, ref, directory, settings)
    ssh: SshFiles | None = None
    if not offline:
        try:
            ssh = ssh_files(settings, key=ssh_key, known_hosts=known_hosts)
        except SshFilesError as exc:
            # Planning still works on the recorded state; say loudly that it is only that.
            err.print(f"[yellow]warning:[/] containers not observed: {escape(str(exc))} (--offline skips "
                      "observing)")
    try:
        database = open_database(settings)
        try:
            survey = plan_source(source, database, ssh_key=ssh.key if ssh else None,
                                 known_hosts=ssh.known_hosts if ssh else None, ssh_config=ssh.config if ssh else None,
                                 prune=settings.prune if prune is None else prune)
            # What apply would hold back now: replicas in crash-loop backoff (a failed rollout included).
            _take, held = hold_back(database, survey.plan.changes, now=datetime.now(UTC))
        finally:
            database.close()
    except (DatabaseError, NodeSetupError) as exc:
        _fail(str(exc))
    result = survey.plan
    reach = plan_reach(result, source.desired, survey.workers)
    if as_json:
        revision = source.revision
        live = survey.live
        document = {
            "source": {
                "origin": source.origin,
                "revision": revision.sha if revision else None,
                "subject": revision.subject if revision else None,
            },
            **plan_document(result, reach),
            "observed": {
                "live": live.observed_live,
                "unreachable": dict(live.unreachable),
                "notReady": dict(survey.not_ready),
                "lost": [{"replica": f"{x.deployment}/{x.ordinal}", "status": x.status, "message": x.message}
                         for x in live.lost],
                "orphans": [{"worker": o.worker, "name": o.name, "reason": o.reason} for o in live.orphans],
            },
            "heldBack": [{"replica": f"{h.deployment}/{h.replica}", "until": h.until.isoformat(),
                          "attempt": h.attempt} for h in held],
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        render_observation(out, survey)
        render_plan(out, result, header=f"Plan for {_describe(source)}", show_noop=show_unchanged, reach=reach)
        render_orphans(out, survey)
        for item in held:
            out.print(f"  [yellow]held back[/] {escape(item.deployment)}/{item.replica}: {item.reason}")
        if show_commands:
            _print_commands(result, source)
    raise typer.Exit(2 if result.has_changes or result.unplaceable or survey.live.orphans else 0)


def _print_commands(result: Plan, source: Source) -> None:
    commands = render_commands(result, source.desired)
    if commands:
        out.print("\nContainers to create (ports are chosen at apply time; env values are not shown):")
    for name, command in commands:
        out.print(f"  {name}:", style="bold")
        out.print(f"    {command}", markup=False)


def _ssh_files(settings: Settings, ssh_key: Path | None, known_hosts: Path | None) -> SshFiles:
    try:
        return ssh_files(settings, key=ssh_key, known_hosts=known_hosts)
    except SshFilesError as exc:
        _fail(str(exc))


@app.command()
def facts(
    repo: RepoOption = ".",
    ref: RefOption = "HEAD",
    directory: DirOption = None,
    ssh_key: SshKeyOption = None,
    known_hosts: KnownHostsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the gathered facts as JSON.")] = False,
) -> None:
    """Gather node facts (GPUs, Docker, CPUs, memory, disk) from every worker and store them. Exit 1 if
    any worker failed (it is NotReady until a gathering succeeds)."""
    settings = Settings()
    source = _source(repo, ref, directory, settings)
    ssh = _ssh_files(settings, ssh_key, known_hosts)
    try:
        database = open_database(settings)
        try:
            report = gather_facts(source, database, ssh_key=ssh.key, known_hosts=ssh.known_hosts, ssh_config=ssh.config)
        finally:
            database.close()
    except (DatabaseError, FactsError) as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        render_facts(out, report, header=f"Facts for the workers of {_describe(source)}")
    raise typer.Exit(1 if report.failed else 0)


@app.command()
def prepare(
    repo: RepoOption = ".",
    ref: RefOption = "HEAD",
    directory: DirOption = None,
    ssh_key: SshKeyOption = None,
    known_hosts: KnownHostsOption = None,
    install: Annotated[bool, typer.Option(
        "--install", help="Install what is missing (docker.io, nvidia-container-toolkit from apt), start Docker "
                          "and register the nvidia runtime (restarts Docker). Without it, only check.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Make every worker ready: Docker answering, the NVIDIA runtime where GPU replicas may run, the model
    cache directory, and the images its deployments need (pulled when missing). Exit 1 if any worker failed."""
    # Imported here, not at the top: this command's own modules (the top is shared by every command).
    from lmstack.cli.render_prepare import render_prepare
    from lmstack.reconcile.prepare import PrepareError, prepare_workers

    settings = Settings()
    source = _source(repo, ref, directory, settings)
    ssh = _ssh_files(settings, ssh_key, known_hosts)
    try:
        report = prepare_workers(source, ssh_key=ssh.key, known_hosts=ssh.known_hosts, ssh_config=ssh.config,
                                 install=install, images=None)
    except PrepareError as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        render_prepare(out, report, header=f"Preparing the workers of {_describe(source)}"
                                           + (" (installing what is missing)" if install else ""))
    raise typer.Exit(1 if report.failed else 0)


@app.command()
def apply(
    repo: RepoOption = ".",
    ref: RefOption = "HEAD",
    directory: DirOption = None,
    ssh_key: SshKeyOption = None,
    known_hosts: KnownHostsOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=64,
                                          help="Actions run at once across workers.")] = 8,
    show_commands: Annotated[bool, typer.Option(
        "--show-commands", help="Print the `docker run` equivalent of each container to be created.")] = False,
    prune: PruneOption = None,
) -> None:
    """Make the workers match the commit: gather facts, plan, show the plan, ask, then create and remove
    containers and wait until replicas are ready. Exit 1 if anything failed (the others still converge)."""
    settings = Settings()
    source = _source(repo, ref, directory, settings)
    ssh = _ssh_files(settings, ssh_key, known_hosts)

    def confirm(survey: Survey) -> bool:
        render_observation(out, survey)
        render_plan(out, survey.plan, header=f"Plan for {_describe(source)}",
                    reach=plan_reach(survey.plan, source.desired, survey.workers))
        render_orphans(out, survey)
        if show_commands:
            _print_commands(survey.plan, source)
        if yes:
            return True
        if not sys.stdin.isatty():
            answer = sys.stdin.readline().strip().lower()
            return answer in ("y", "yes")
        return typer.confirm("Apply these changes?", default=False)

    def progress(action: Action, status: str) -> None:
        out.print(f"[dim]{datetime.now():%H:%M:%S}[/] {escape(action.replica_name)}: {escape(status)}")

    def waiting(holder: Holder | None) -> None:
        err.print(f"Waiting: {escape(str(holder or 'another process'))} is applying.")

    started = time.monotonic()
    try:
        database = open_database(settings)
        try:
            # One applier at a time, the controller of `lmstack serve` included: wait for whoever applies.
            with lead(database, role="apply", on_wait=waiting) as leadership:
                if leadership.interrupted_runs:
                    err.print(f"[yellow]Sync runs {', '.join(map(str, leadership.interrupted_runs))} were left "
                              "running by a process that stopped; marked interrupted.[/]")
                survey, report = apply_source(source, database, ssh_key=ssh.key, known_hosts=ssh.known_hosts,
                                                ssh_config=ssh.config, confirm=confirm, progress=progress,
                                                parallel=parallel, route_refresh_s=settings.registry_refresh_s,
                                                prune=settings.prune if prune is None else prune)
        finally:
            database.close()
    except (DatabaseError, FactsError, NodeSetupError) as exc:
        _fail(str(exc))
    if report is None:
        _fail("Apply cancelled; nothing was changed.")
    if not report.results and not report.orphans_removed and not report.errors:
        render_observation(out, survey)
        render_plan(out, survey.plan, header=f"Plan for {_describe(source)}")
        for problem in report.problems:
            err.print(f"[red]failed:[/] {escape(str(problem))}")
        raise typer.Exit(0 if report.ok else 1)
    counts = {kind: sum(1 for r in report.results if r.ok and r.action.kind is kind) for kind in ActionKind}
    out.print(f"\n[bold]Apply {'complete' if report.ok else 'finished with failures'}:[/] "
              f"{counts[ActionKind.CREATE]} created, {counts[ActionKind.RECREATE]} recreated, "
              f"{counts[ActionKind.UPDATE]} updated in place, {counts[ActionKind.DELETE]} deleted, "
              f"{report.orphans_removed} orphans removed, {len(report.failed)} failed "
              f"({time.monotonic() - started:.1f} s, sync run {report.sync_run}).")
    for result in report.failed:
        err.print(f"[red]failed:[/] {escape(result.action.replica_name)}: {escape(result.message)}")
    for error in report.errors:
        err.print(f"[red]failed:[/] {escape(error)}")
    for problem in report.problems:
        err.print(f"[red]failed:[/] {escape(str(problem))}")
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def status(
    repo: Annotated[str | None, typer.Option(
        "--repo", envvar="LMSTACK_REPO",
        help="The fleet's Git repository: its commit at --ref is compared with what was applied.")] = None,
    ref: RefOption = "HEAD",
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Where each deployment stands, from the database: Synced, OutOfSync, Progressing or Degraded, with its
    last applied and last attempted revision and its replicas. Exit 0: all Synced; 2: not all; 1: error."""
    settings = Settings()
    head: str | None = None
    desired: dict[str, str] | None = None
    if repo is not None:
        try:
            snapshot = read_commit(repo, ref, cache_dir=settings.repo_cache_dir)
        except SourceError as exc:
            _fail(str(exc))
        head = snapshot.revision.sha if snapshot.revision else None
        try:
            deployments = parse_snapshot(snapshot, limits=push_limits(settings)).desired.deployments
            desired = {name: spec_hash(effective_spec(name, d.spec)) for name, d in deployments.items()}
        except ManifestValidationError as exc:
            err.print(f"[yellow]warning:[/] the commit's manifests do not validate ({len(exc.errors)} errors): "
                      "its deployments are not compared")
    try:
        database = open_database(settings)
        try:
            with database.session() as session:
                found = fleet_status(session, head=head, desired=desired)
        finally:
            database.close()
    except DatabaseError as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(found.to_json(), indent=2) + "\n")
    else:
        render_status(out, found)
    synced = all(d.state == "Synced" for d in found.deployments) and found.sync in ("Synced", "Unknown")
    raise typer.Exit(0 if synced else 2)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(
        "--host", help="Address to listen on (default: LMSTACK_HOST, else 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(
        "--port", min=1, max=65535, help="Port to listen on (default: LMSTACK_PORT, else 8080).")] = None,
    access_log: Annotated[bool, typer.Option(
        "--access-log", help="Log a line per HTTP request (off by default: it costs more than the proxying).")]
        = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="Server processes sharing the port, the limits and the metrics (default: "
        "LMSTACK_WORKERS, else the number of cores this process may use). 1: a single process.")] = None,
) -> None:
    """Run the API server: the OpenAI-compatible gateway (/v1), the read-only status API (/api), live logs,
    /metrics and /healthz, /readyz. Logging in needs a user: create one first with
    `lmstack users create NAME --admin`. Settings come from LMSTACK_* variables: LMSTACK_DATABASE_URL,
    LMSTACK_REPO and LMSTACK_REF (the repository /api/plan and the sync state read), LMSTACK_SSH_KEY and
    LMSTACK_KNOWN_HOSTS (live logs)."""
    # Imported here: the server's modules (FastAPI, uvicorn) are only this command's.
    from lmstack.api.server import run_server

    settings = Settings()
    try:
        started = run_server(settings, host=host or settings.host, port=port or settings.port,
                             access_log=access_log, workers=workers or settings.workers)
    except DatabaseError as exc:
        _fail(str(exc))
    raise typer.Exit(0 if started else 1)


@app.command()
def schema() -> None:
    """Print the JSON Schema of manifest documents (for editors: yaml-language-server)."""
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Migrate the database schema up (it also happens automatically on first use)."""
    try:
        database = open_database(Settings(), migrate=False)
        try:
            before = current_revision(database)
            upgrade(database, revision)
            out.print(f"Database {database.url}: {before or 'empty'} -> {current_revision(database)}")
        finally:
            database.close()
    except DatabaseError as exc:
        _fail(str(exc))


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision ('base' removes everything).")],
                 yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False) -> None:
    """Migrate the database schema down. Dropping tables loses their data."""
    try:
        database = open_database(Settings(), migrate=False)
        try:
            if not yes:
                typer.confirm(f"Downgrade {database.url} to {revision}? Data in dropped tables is lost", abort=True)
            downgrade(database, revision)
            out.print(f"Database {database.url}: now at {current_revision(database) or 'base (empty)'}")
        finally:
            database.close()
    except DatabaseError as exc:
        _fail(str(exc))


@db_app.command("status")
def db_status() -> None:
    """Show where the database is and which schema revision it has."""
    try:
        database = open_database(Settings(), migrate=False)
        try:
            current = current_revision(database)
            head = head_revision()
            state = "up to date" if current == head else f"behind (latest is {head}; run `lmstack db upgrade`)"
            out.print(f"Database {database.url}: revision {current or 'none'}, {state}")
        finally:
            database.close()
    except DatabaseError as exc:
        _fail(str(exc))


def run() -> None:
    app()
