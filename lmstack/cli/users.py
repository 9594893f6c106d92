"""`lmstack users ...` and `lmstack keys ...`: accounts and API keys, straight in the database."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.orm import Session

from lmstack.config import Settings
from lmstack.state import DatabaseError, open_database

if TYPE_CHECKING:
    from lmstack.api.services.keys import KeyRecord
    from lmstack.api.services.users import UserRecord

# The services are imported inside the commands: importing lmstack.api loads the whole web stack, which
# the other commands should not wait for.

users_app = typer.Typer(help="Users who log in to the API and the dashboard (there is no default user).",
                        no_args_is_help=True)
keys_app = typer.Typer(help="API keys for the OpenAI-compatible endpoint (/v1).", no_args_is_help=True)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]

_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


@contextmanager
def _session() -> Iterator[Session]:
    """A session on the configured database, committed when the block succeeds; failures become messages."""
    from lmstack.api.services.keys import ApiKeyError
    from lmstack.api.services.users import UserError

    try:
        database = open_database(Settings())
    except DatabaseError as exc:
        _fail(str(exc))
    try:
        with database.session() as session:
            yield session
    except (UserError, ApiKeyError) as exc:
        _fail(str(exc))
    finally:
        database.close()


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `3600s`, `2w` (units may be combined: `1d12h`)."""
    cleaned = text.strip().lower()
    parts = _DURATION.findall(cleaned)
    if not cleaned or _DURATION.sub("", cleaned).strip():
        raise typer.BadParameter(f"{text!r}: expected a duration such as 30d, 12h, 90m (units s m h d w)")
    try:
        delta = sum((timedelta(**{_UNITS[unit]: int(n)}) for n, unit in parts), timedelta())
    except OverflowError:
        raise typer.BadParameter(f"{text!r}: too long a duration") from None
    if delta <= timedelta(0):
        raise typer.BadParameter(f"{text!r}: must be longer than zero")
    return delta


def _when(value: datetime | None, empty: str = "-") -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value is not None else empty


# -- users -----------------------------------------------------------------------------------------


def _read_password(from_stdin: bool) -> str:
    from lmstack.api.services.users import MIN_PASSWORD_LENGTH

    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        _fail("no terminal to ask for the password on: pipe it in with --password-stdin")
    password: str = typer.prompt(f"Password (at least {MIN_PASSWORD_LENGTH} characters)", hide_input=True,
                                 confirmation_prompt="Repeat the password")
    return password


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Argument(help="The user name (letters, digits, . _ @ -).")],
    admin: Annotated[bool, typer.Option("--admin", help="May manage every user's keys (default: viewer).")] = False,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from the first line of stdin instead of asking twice.")] = False,
) -> None:
    """Create a user; the password is asked twice on a terminal (or read with --password-stdin)."""
    from lmstack.api.services.users import UserError, check_name, check_password, create_user

    try:
        check_name(name)
        password = _read_password(password_stdin)
        check_password(password)
    except UserError as exc:
        _fail(str(exc))
    with _session() as session:
        user = create_user(session, name=name, password=password, role="admin" if admin else "viewer")
    out.print(f"Created {user.role} {escape(user.name)}.")


def _user_json(user: UserRecord) -> dict[str, Any]:
    return {"id": user.id, "name": user.name, "role": user.role, "disabled": user.disabled,
            "created_at": user.created_at.isoformat()}


@users_app.command("list")
def users_list(as_json: JsonOption = False) -> None:
    """List the users."""
    from lmstack.api.services.users import list_users

    with _session() as session:
        users = list_users(session)
    if as_json:
        sys.stdout.write(json.dumps([_user_json(u) for u in users], indent=2) + "\n")
        return
    if not users:
        out.print("No users. Create one with `lmstack users create NAME --admin`.")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "ROLE", "STATUS", "CREATED"):
        table.add_column(column)
    for user in users:
        table.add_row(escape(user.name), user.role, "disabled" if user.disabled else "active", _when(user.created_at))
    out.print(table)


@users_app.command("disable")
def users_disable(name: Annotated[str, typer.Argument(help="The user name.")]) -> None:
    """Disable a user: no more logins, and their tokens and API keys stop working (within about a second)."""
    from lmstack.api.services.users import set_disabled

    with _session() as session:
        set_disabled(session, name=name, disabled=True)
    out.print(f"Disabled {escape(name)}.")


@users_app.command("enable")
def users_enable(name: Annotated[str, typer.Argument(help="The user name.")]) -> None:
    """Enable a disabled user again."""
    from lmstack.api.services.users import set_disabled

    with _session() as session:
        set_disabled(session, name=name, disabled=False)
    out.print(f"Enabled {escape(name)}.")


# -- keys ------------------------------------------------------------------------------------------


def _key_json(key: KeyRecord) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {"id": key.id, "name": key.name, "user": key.user, "prefix": key.prefix,
            "models": list(key.models) if key.models is not None else None, "scopes": list(key.scopes),
            "rpm_limit": key.rpm_limit, "tpm_limit": key.tpm_limit, "tpd_limit": key.tpd_limit,
            "expires_at": iso(key.expires_at), "revoked_at": iso(key.revoked_at), "created_at": iso(key.created_at),
            "last_used_at": iso(key.last_used_at), "status": key.status}


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="What the key is for.")],
    user: Annotated[str, typer.Option("--user", help="Whose key it is.")],
    models: Annotated[str | None, typer.Option(
        "--models", help="Comma-separated models it may use [default: all].")] = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", help="Lifetime such as 30d, 12h, 90m [default: never].")] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute [default: no limit].")] = None,
    tpm: Annotated[int | None, typer.Option(
        "--tpm", min=1, help="Tokens per minute, prompt + completion, per server [default: no limit].")] = None,
    tpd: Annotated[int | None, typer.Option(
        "--tpd", min=1, help="Tokens per UTC day, across servers [default: no limit].")] = None,
    scopes: Annotated[list[str] | None, typer.Option(
        "--scope", help="What it reaches beyond /v1 and its own usage: status, metrics or logs (repeat for "
                        "several) [default: nothing more].")] = None,
) -> None:
    """Create an API key and print it: this is the only time it is shown (the database keeps a hash)."""
    from lmstack.api.services.keys import create_key

    expires_at = datetime.now(UTC) + parse_duration(expires) if expires is not None else None
    allowed = models.split(",") if models is not None else None
    with _session() as session:
        created = create_key(session, user=user, name=name, models=allowed, rpm_limit=rpm, expires_at=expires_at,
                             scopes=scopes or (), tpm_limit=tpm, tpd_limit=tpd)
    key = created.record
    allowed_text = escape(", ".join(key.models)) if key.models is not None else "all"
    err.print(f"Created API key {key.id} ({key.prefix}…) \"{escape(key.name)}\" for {escape(key.user)}; "
              f"models: {allowed_text}; expires: {_when(key.expires_at, 'never')}; "
              f"rpm: {key.rpm_limit or 'no limit'}; tokens a minute: {key.tpm_limit or 'no limit'}; tokens a day: "
              f"{key.tpd_limit or 'no limit'}; scopes: {', '.join(key.scopes) or 'none (only /v1)'}.")
    err.print("[bold]Copy the key now: it is not shown again.[/]")
    sys.stdout.write(created.token + "\n")  # alone on stdout: KEY=$(lmstack keys create ...)


@keys_app.command("list")
def keys_list(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's keys.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List API keys (never the keys themselves)."""
    from lmstack.api.services.keys import list_keys

    with _session() as session:
        keys = list_keys(session, user=user)
    if as_json:
        sys.stdout.write(json.dumps([_key_json(k) for k in keys], indent=2) + "\n")
        return
    if not keys:
        out.print("No API keys. Create one with `lmstack keys create --name NAME --user USER`.")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "PREFIX", "NAME", "USER", "MODELS", "SCOPES", "RPM", "TPM", "TPD", "EXPIRES", "STATUS",
                   "LAST USED"):
        table.add_column(column)
    for key in keys:
        table.add_row(str(key.id), key.prefix, escape(key.name), escape(key.user),
                      escape(",".join(key.models)) if key.models is not None else "all", ",".join(key.scopes) or "-",
                      *(str(limit) if limit is not None else "-"
                        for limit in (key.rpm_limit, key.tpm_limit, key.tpd_limit)),
                      _when(key.expires_at, "never"),
                      key.status if key.status != "revoked" else f"revoked {_when(key.revoked_at)}",
                      _when(key.last_used_at, "never"))
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(ref: Annotated[str, typer.Argument(metavar="ID|PREFIX", help="The key's id or prefix.")]) -> None:
    """Revoke an API key: every server refuses it within about a second."""
    from lmstack.api.services.keys import find_key, revoke_key

    with _session() as session:
        key = revoke_key(session, key_id=find_key(session, ref=ref).id)
    out.print(f"Revoked API key {key.id} ({key.prefix}…) \"{escape(key.name)}\" of {escape(key.user)}.")
