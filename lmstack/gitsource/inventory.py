"""Parse the Ansible inventory with ansible-core itself; the only module that imports `ansible`.

Using ansible's own parser means any INI or YAML inventory (with group_vars/ and host_vars/) that
works with `ansible-playbook -i` works here, with the same variable precedence. The snapshot's
`inventory/` folder is written to a fresh temporary directory for each parse, because ansible reads
paths, not bytes.

ansible keeps process-wide state (its Display singleton, constants, path caches in the
host_group_vars plugin), so parses run one at a time under a lock and undo what they change.

Reading an inventory never runs code from the repository: only the static formats are enabled (INI,
YAML, TOML; not `auto`, which would load any plugin a YAML file names, nor `script`), and the connection
variables that may be templates ("{{ inventory_hostname }}.lan") are rendered in a sandboxed Jinja
environment without Ansible's lookups (`lookup('pipe', ...)` would run a command here).

The repository decides where a host is (`ansible_host`, `ansible_port`, `ansible_user`) and which Python
runs there (`ansible_python_interpreter`), nothing else about how ansible connects: any other `ansible_*`
variable (a ProxyCommand in `ansible_ssh_common_args`, `ansible_connection: local`, become settings) is an
error, and the connection values must be a plain address, user and port, never ssh options. Files are
bounded in size and number, and YAML in alias expansion and nesting, before ansible's parser sees them.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, NamedTuple

import jinja2
import jinja2.sandbox

from lmstack.manifests.errors import ManifestError, ManifestValidationError
from lmstack.manifests.yamlsource import limit_errors

log = logging.getLogger(__name__)

INVENTORY_DIR = "inventory"
DEFAULT_PORT = 22
STATIC_INVENTORY_PLUGINS = ("ini", "yaml", "toml")

# What the repository may say about the connection; every other ansible_* variable is refused.
_CONNECTION_VARS = ("ansible_host", "ansible_ssh_host", "ansible_port", "ansible_ssh_port", "ansible_user",
                    "ansible_ssh_user")
_INTERPRETER = "ansible_python_interpreter"
_ALLOWED = frozenset({*_CONNECTION_VARS, _INTERPRETER})

# Bounds on what is handed to ansible's parser (which has none): far above any real fleet's inventory.
MAX_FILES = 500
MAX_FILE_BYTES = 256 * 1024
MAX_TOTAL_BYTES = 1024 * 1024
MAX_HOSTS = 10_000  # after INI/YAML host ranges (`gpu-[0:99]`) are expanded
# What VariableManager.get_vars adds on its own; not the user's variables.
_MAGIC = frozenset(
    {
        "ansible_check_mode",
        "ansible_config_file",
        "ansible_diff_mode",
        "ansible_facts",
        "ansible_forks",
        "ansible_inventory_sources",
        "ansible_play_batch",
        "ansible_play_hosts",
        "ansible_play_hosts_all",
        "ansible_playbook_python",
        "ansible_run_tags",
        "ansible_skip_tags",
        "ansible_verbosity",
        "ansible_version",
        "group_names",
        "groups",
        "hostvars",
        "inventory_dir",
        "inventory_file",
        "inventory_hostname",
        "inventory_hostname_short",
        "omit",
        "playbook_dir",
        "play_hosts",
        "role_names",
    }
)
_YAML_SUFFIXES = (".yml", ".yaml", ".json")
_LOCK = threading.Lock()


@dataclass(frozen=True)
class InventoryHost:
    name: str
    address: str  # ansible_host, else the name: a host name or an IP address
    port: int  # ansible_port, else 22
    user: str | None  # ansible_user
    groups: tuple[str, ...]  # as ansible's group_names: sorted, without "all"
    vars: Mapping[str, object]  # the host's own variables (group_vars/host_vars applied), no ansible_* ones
    python_interpreter: str | None = None  # ansible_python_interpreter: an absolute path
    # This machine, as the operator said (LMSTACK_LOCAL_HOST, `lmstack up`), never the repository: reached with
    # Ansible's local connection and the local Docker; `address`, `port` and `user` are then not used.
    local: bool = False

    def __post_init__(self) -> None:
        # What lmstack hands to ssh and ansible: a host built by any path holds only plain connection values.
        problems = [
            what for what, bad in (
                ("name", not _is_address(self.name)),
                ("address", not _is_address(self.address)),
                ("port", not 0 < self.port < 65536),
                ("user", self.user is not None and _USER.fullmatch(self.user) is None),
                ("python_interpreter", self.python_interpreter is not None
                 and _PATH.fullmatch(self.python_interpreter) is None),
                ("vars", any(str(key).startswith("ansible_") for key in self.vars)),
            ) if bad
        ]
        if problems:
            raise ValueError(f"inventory host {self.name!r}: not a plain connection value: {', '.join(problems)}")


@dataclass(frozen=True)
class Inventory:
    hosts: Mapping[str, InventoryHost]
    # ansible's warnings (e.g. a skipped unknown key), kept instead of printed to the terminal
    warnings: tuple[str, ...] = field(default=())


def parse_inventory(files: Mapping[str, bytes], *, local_host: str | None = None) -> Inventory:
    """Parse every file under `inventory/` in `files` (repository-relative paths) as one inventory.

    `local_host` is the operator's choice of the host that is this machine (marked `local`); the files cannot
    make a host local. Raises ManifestValidationError naming `inventory/...` files for anything ansible cannot
    parse.
    """
    prefix = f"{INVENTORY_DIR}/"
    inventory_files = {path[len(prefix) :]: data for path, data in files.items() if path.startswith(prefix)}
    if not inventory_files:
        raise ManifestValidationError(
            [_error(prefix, 0, "no inventory: add an Ansible inventory (INI or YAML) under inventory/")]
        )
    errors: list[ManifestError] = []
    for relative in inventory_files:
        parts = PurePosixPath(relative).parts
        if not parts or ".." in parts or PurePosixPath(relative).is_absolute():
            errors.append(_error(prefix + relative, 0, "invalid file path"))
    if errors:
        raise ManifestValidationError(errors)
    errors = _limits(inventory_files)
    if errors:
        raise ManifestValidationError(errors)

    started = time.perf_counter()
    with _LOCK:
        api = _ansible()
        result = _parse_reporting_all(api, inventory_files)
    elapsed_ms = 1e3 * (time.perf_counter() - started)
    log.debug("parsed inventory (%d files) in %.1f ms", len(inventory_files), elapsed_ms)
    if isinstance(result, Inventory):
        if local_host is not None and local_host in result.hosts:
            hosts = {**result.hosts, local_host: replace(result.hosts[local_host], local=True)}
            return replace(result, hosts=MappingProxyType(hosts))
        return result
    raise ManifestValidationError(result)


# --- one parse -------------------------------------------------------------------------------------


def _parse_reporting_all(api: _Ansible, files: dict[str, bytes]) -> Inventory | list[ManifestError]:
    """Parse; on an error in a file, set that file aside and parse again, so all bad files are reported.

    ansible stops at the first unparseable file; a few re-parses (milliseconds each) find the rest.
    """
    errors: list[ManifestError] = []
    remaining = dict(files)
    for attempt in range(len(files) + 1):
        result = _parse_once(api, remaining)
        if isinstance(result, Inventory):
            return errors if errors else result
        # Once a file was set aside, an ansible failure that names no file is a consequence of that
        # (e.g. nothing is left to parse), not a problem of its own.
        if attempt == 0 or result.culprit is not None or not result.from_ansible:
            errors.extend(result.errors)
        if result.culprit is None or result.culprit not in remaining:
            break
        del remaining[result.culprit]
    return errors


class _Failed(NamedTuple):
    errors: list[ManifestError]
    culprit: str | None  # the inventory-relative file to blame, if ansible named one
    from_ansible: bool  # ansible refused the inventory (not one of our per-host checks)


def _parse_once(api: _Ansible, files: dict[str, bytes]) -> Inventory | _Failed:
    with tempfile.TemporaryDirectory(prefix="lmstack-inventory-") as temp:
        root = Path(temp) / INVENTORY_DIR
        for relative, data in files.items():
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            # Written without the executable bit, so ansible's `script` plugin never runs repository code.
            target.write_bytes(data)
        paths = _PathNames(root)
        try:
            with _captured(api) as capture:
                try:
                    return _build(api, root, paths, capture, _Locator(files))
                except api.AnsibleError as error:
                    return _describe_failure(error, capture, paths)
        finally:
            _forget_paths(temp)


def _build(api: _Ansible, root: Path, paths: _PathNames, capture: _Capture,
           locate: _Locator) -> Inventory | _Failed:
    loader = api.DataLoader()
    # The "playbook dir" is an empty folder: group_vars/ in the current directory must not leak in.
    loader.set_basedir(str(root.parent))
    manager = api.StaticInventoryManager(loader=loader, sources=[str(root)])
    variables = api.VariableManager(loader=loader, inventory=manager)
    hosts: dict[str, InventoryHost] = {}
    errors: list[ManifestError] = []
    for host in manager.get_hosts():
        name = str(host.name)
        raw = variables.get_vars(host=host, include_hostvars=False)
        built = _host(name, raw, host, capture, locate)
        if isinstance(built, InventoryHost):
            hosts[name] = built
        else:
            errors.extend(built)
    if errors:
        return _Failed(errors, None, from_ansible=False)
    for key in sorted(capture.omitted):
        # e.g. a vault-encrypted value: lmstack has no vault password, and it is a secret anyway
        capture.warnings.append(f"variable {key!r} omitted: vault-encrypted or not plain data")
    warnings = tuple(dict.fromkeys(paths.rewrite(w) for w in capture.warnings))
    return Inventory(hosts=MappingProxyType(dict(sorted(hosts.items()))), warnings=warnings)


def _host(name: str, raw: Mapping[str, Any], host: Any, capture: _Capture,
          locate: _Locator) -> InventoryHost | list[ManifestError]:
    errors: list[ManifestError] = []
    groups = tuple(sorted(str(group.name) for group in host.get_groups() if group.name != "all"))

    def error(key: str, raw_value: object, message: str) -> None:
        errors.extend(_error(file, line, f"host {name}: {message}") for file, line in locate.value(key, raw_value))

    for key in sorted(str(key) for key in raw):
        if key.startswith("ansible_") and key not in _ALLOWED and key not in _MAGIC:
            errors.extend(locate.forbidden(key, name))

    def connection(keys: tuple[str, str], problem: Callable[[object], str | None]) -> str | None:
        """The first of `keys` (a variable and its ansible_ssh_* alias) that is set, rendered: they may be
        templates ("{{ inventory_hostname }}.lan", rendered without lookups, see the module docstring). Each
        one set is checked, used or not."""
        chosen = None
        for key in keys:
            if key not in raw or raw[key] is None:
                continue
            try:
                value = _render(raw[key], raw, name=name, groups=groups)
            except (jinja2.TemplateError, _Unrepresentable) as exc:
                hint = ("; lmstack renders connection variables without Ansible's lookups and filters"
                        if isinstance(exc, jinja2.UndefinedError | jinja2.TemplateAssertionError) else "")
                error(key, raw[key], f"{key}: {exc}{hint}")
                continue
            if value in (None, ""):
                continue
            wrong = problem(value)
            if wrong:
                error(key, raw[key], f"{key} {_shown(value)} {wrong}")
            elif chosen is None:
                chosen = str(value)
        return chosen

    if not _is_address(name):
        errors.extend(_error(file, line, f"host name {name!r} is not a host name or IP address (letters, digits, "
                                         "'.', '-' and '_'; not starting with '-')")
                      for file, line in locate.name(name))
    address = connection(("ansible_host", "ansible_ssh_host"), lambda value: None if _is_address(str(value)) else (
        "is not a host name or IP address (letters, digits, '.', '-' and '_'; not starting with '-'; ssh options "
        "belong in the operator's ssh_config)"))
    user = connection(("ansible_user", "ansible_ssh_user"), lambda value: None if _USER.fullmatch(str(value)) else (
        "is not a user name (letters, digits, '.', '-' and '_')"))
    port_value = connection(("ansible_port", "ansible_ssh_port"),
                            lambda value: None if _port(value) is not None else "is not a port number")
    port = _port(port_value) if port_value is not None else None
    interpreter = raw.get(_INTERPRETER)
    if interpreter is not None and not (isinstance(interpreter, str) and _PATH.fullmatch(interpreter)):
        error(_INTERPRETER, interpreter, f"{_INTERPRETER} {_shown(interpreter)} is not a plain absolute path "
                                         "(no templates, spaces or shell characters)")
    if errors:
        return errors

    host_vars: dict[str, object] = {}
    for key, value in raw.items():
        key = str(key)
        if key in _MAGIC or key.startswith("ansible_"):
            continue
        try:
            host_vars[key] = _plain(value)
        except _Unrepresentable:
            capture.omitted.add(key)
    return InventoryHost(
        name=name,
        address=address or name,
        port=port or DEFAULT_PORT,
        user=user,
        groups=groups,
        vars=MappingProxyType(host_vars),
        python_interpreter=str(interpreter) if interpreter is not None else None,
    )


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_PATH = re.compile(r"/[A-Za-z0-9_.+/-]{0,255}")


def _is_address(text: str) -> bool:
    """A host name or an IP address: nothing ssh could take for an option (`-oProxyCommand=...`)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return len(text) <= 253 and _HOSTNAME.fullmatch(text) is not None


def _port(value: object) -> int | None:
    try:
        port = int(str(value))
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Unrepresentable(Exception):
    pass


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja for connection values ("{{ inventory_hostname }}.lan"): no lookups, no Ansible filters, no
    attribute access to Python internals, and nothing that grows a value without bound (`'x' * 10**10`,
    `'{:>999999999}'.format(1)`, `lipsum(10**6)`), so rendering stays small and quick."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (left, right))
        if not numbers:
            raise jinja2.exceptions.SecurityError(f"{operator!r} is only for numbers here")
        if operator == "**" and (abs(left) > 2**64 or abs(right) > 64):
            raise jinja2.exceptions.SecurityError("the power is too large")
        return super().call_binop(context, operator, left, right)

    def is_safe_callable(self, obj: Any) -> bool:
        # No method calls (str.format, center, ljust... pad to any length). An undefined name is "called"
        # only to say that it is undefined (`lookup(...)`).
        return isinstance(obj, jinja2.Undefined)


_SANDBOX = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False)
_SANDBOX.globals.clear()  # range, lipsum, cycler, ...: none of them name a host
_SANDBOX.filters = {name: _SANDBOX.filters[name] for name in (
    "default", "d", "lower", "upper", "trim", "string", "int", "length", "count", "first", "last")}
_MAX_RENDER_DEPTH = 10  # a variable naming a variable naming ... (and no endless self-reference)
_MAX_TEMPLATE = 1024  # characters of a connection value, as written and as rendered
_MAX_CONTEXT_STRING = 256  # longer variables are not offered to connection templates


def _render(value: object, raw: Mapping[str, Any], *, name: str, groups: tuple[str, ...]) -> object:
    """`value` with its Jinja templates rendered against the host's variables, in a sandbox (see _Sandbox).
    Templates in the variables it uses are rendered too. Raises jinja2.TemplateError."""
    value = _plain(value)
    if not isinstance(value, str) or ("{{" not in value and "{%" not in value):
        return value
    if "{%" in value:
        raise jinja2.TemplateError("only {{ }} expressions are allowed here, not {% %} statements")
    if len(value) > _MAX_TEMPLATE:
        raise jinja2.TemplateError(f"the template is longer than {_MAX_TEMPLATE} characters")
    # Only short scalars: the rendered value is bounded by the template's length times theirs.
    context: dict[str, object] = {}
    for key, item in raw.items():
        try:
            plain = _plain(item)
        except _Unrepresentable:
            continue  # e.g. vault-encrypted: cannot be used in a connection variable either
        if isinstance(plain, int | float | bool) or (isinstance(plain, str) and len(plain) <= _MAX_CONTEXT_STRING):
            context[str(key)] = plain
    group_names = [group for group in groups if group != "ungrouped"]
    context.update(inventory_hostname=name, inventory_hostname_short=name.split(".")[0])
    if sum(len(group) for group in group_names) <= _MAX_CONTEXT_STRING:
        context["group_names"] = group_names
    rendered: str = value
    for _ in range(_MAX_RENDER_DEPTH):
        rendered = _SANDBOX.from_string(rendered).render(context)
        if len(rendered) > _MAX_TEMPLATE:
            raise jinja2.TemplateError(f"the rendered value is longer than {_MAX_TEMPLATE} characters")
        if "{%" in rendered:
            raise jinja2.TemplateError("only {{ }} expressions are allowed here, not {% %} statements")
        if "{{" not in rendered:
            return rendered
    raise jinja2.TemplateError(f"{value!r} still has templates after {_MAX_RENDER_DEPTH} renderings")


def _plain(value: object) -> object:
    """Plain Python data: ansible (2.19+) hands back tagged subclasses of str, int, dict and list."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, date):  # YAML timestamps
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    raise _Unrepresentable(type(value).__name__)


# --- bounds on the files -----------------------------------------------------------------------------

_YAML_CANDIDATES = ("", *_YAML_SUFFIXES)  # ansible's yaml plugin and vars files also read files without one
# A host range as ansible expands it: [0:99], [01:99:2], [a:f]
_RANGE = re.compile(r"\[([^\[\]:]*):([^\[\]:]*)(?::([^\[\]:]*))?\]")


def _limits(files: Mapping[str, bytes]) -> list[ManifestError]:
    """What ansible's parser would take unbounded time or memory for: too many or too large files, YAML alias
    bombs and deep nesting (refused as the manifests loader refuses them), host ranges of millions."""
    prefix = f"{INVENTORY_DIR}/"
    errors = []
    if len(files) > MAX_FILES:
        errors.append(_error(prefix, 0, f"{len(files)} files; an inventory may have at most {MAX_FILES}"))
    total = sum(len(data) for data in files.values())
    if total > MAX_TOTAL_BYTES:
        errors.append(_error(prefix, 0, f"{total} bytes in all; an inventory may have at most {MAX_TOTAL_BYTES}"))
    for relative, data in sorted(files.items()):
        if len(data) > MAX_FILE_BYTES:
            errors.append(_error(prefix + relative, 0, f"{len(data)} bytes; an inventory file may have at most "
                                                       f"{MAX_FILE_BYTES}"))
    if errors:
        return errors  # not read any further: reading is what the limits bound
    hosts = 0
    for relative, data in sorted(files.items()):
        path = PurePosixPath(relative)
        if path.suffix.lower() in _YAML_CANDIDATES:
            errors.extend(limit_errors(prefix + relative, data))
        if {"group_vars", "host_vars"} & set(path.parts):
            continue  # variables only: a "[1:9]" there is a value, not hosts
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            count = _hosts_in(line)
            hosts += count
            if count > MAX_HOSTS:
                errors.append(_error(prefix + relative, number, f"this host range makes {count} hosts; an "
                                                                f"inventory may have at most {MAX_HOSTS}"))
    if hosts > MAX_HOSTS and not errors:
        errors.append(_error(prefix, 0, f"{hosts} hosts once ranges are expanded; at most {MAX_HOSTS}"))
    return errors


def _hosts_in(line: str) -> int:
    """How many hosts ansible's expand_hostname_range makes of `line` (1 without a range); an estimate from
    above where a range is not one ansible accepts (it then refuses the line itself)."""
    count = 1
    for match in _RANGE.finditer(line):
        begin, end, step = match.group(1) or "0", match.group(2), match.group(3) or "1"
        try:
            size = (int(end) - int(begin)) // max(1, int(step)) + 1
        except ValueError:
            size = 52  # letters ([a:Z]) or not a range at all
        count *= max(1, size)
    return count


class _Locator:
    """Finds where a variable is set (`key=` in INI, `key:` in YAML, `key =` in TOML), to name FILE:LINE."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self._lines = {
            f"{INVENTORY_DIR}/{relative}": data.decode("utf-8", errors="replace").splitlines()
            for relative, data in sorted(files.items())
        }

    def _find(self, pattern: re.Pattern[str], text: str | None = None) -> list[tuple[str, int]]:
        return [
            (file, number)
            for file, lines in self._lines.items()
            for number, line in enumerate(lines, 1)
            if not line.lstrip().startswith(("#", ";")) and pattern.search(line) and (text is None or text in line)
        ]

    @staticmethod
    def _key(key: str) -> re.Pattern[str]:
        return re.compile(rf"(?<![\w.-])[\"']?{re.escape(key)}[\"']?\s*[=:]")

    def forbidden(self, key: str, host: str) -> list[ManifestError]:
        message = ("not allowed in the inventory: from Git, only ansible_host, ansible_port, ansible_user (or "
                   "their ansible_ssh_* forms) and ansible_python_interpreter are taken; connection options (jump "
                   "hosts, SSH options) belong in the operator's ssh_config on the lmstack host (LMSTACK_SSH_CONFIG)")
        if re.search("pass|secret|key", key, re.IGNORECASE):
            message += ", and lmstack connects with its own SSH key"
        found = self._find(self._key(key))
        if not found:
            return [ManifestError(f"{INVENTORY_DIR}/", 0, key, f"set for host {host}: {message}")]
        return [ManifestError(file, line, key, message) for file, line in found]

    def value(self, key: str, raw_value: object) -> list[tuple[str, int]]:
        """The lines that set `key` to `raw_value` as written; `inventory/` alone where none does."""
        text = str(raw_value) if isinstance(raw_value, str | int) else None
        found = self._find(self._key(key), text) if text else []
        return found or [(f"{INVENTORY_DIR}/", 0)]

    def name(self, host: str) -> list[tuple[str, int]]:
        found = self._find(re.compile(rf"(?<![\w.-]){re.escape(host)}(?![\w.-])"))
        return found[:1] or [(f"{INVENTORY_DIR}/", 0)]


# --- errors ----------------------------------------------------------------------------------------


def _describe_failure(error: BaseException, capture: _Capture, paths: _PathNames) -> _Failed:
    relative = next(
        (
            found
            for link in _chain(error)
            for found in (paths.find(str(link)), paths.find(repr(getattr(link, "obj", None))))
            if found
        ),
        None,
    )
    file = f"{INVENTORY_DIR}/{relative}" if relative else f"{INVENTORY_DIR}/"
    failures = _relevant(capture.failures, relative)
    if failures:
        errors = [
            _error(
                file, _line_of(exc, paths), f"not a valid {_format_of(plugin)}: {paths.rewrite(_reason(exc))}"
            )
            for plugin, exc in failures
        ]
    else:
        errors = [_error(file, _line_of(error, paths), paths.rewrite(_message(error)))]
    return _Failed(errors, relative, from_ansible=True)


def _relevant(
    failures: list[tuple[str, BaseException | str]], relative: str | None
) -> list[tuple[str, BaseException | str]]:
    """The plugin failures that explain this file: every plugin that tried it failed, but only the one
    meant for its format has a useful message (the INI parser's complaint about a YAML file is noise)."""
    suffix = PurePosixPath(relative or "").suffix.lower()
    if suffix in _YAML_SUFFIXES:
        wanted = {"auto", "yaml"}
    elif suffix == ".toml":
        wanted = {"toml"}
    else:
        wanted = {"ini"}
    chosen = [(plugin, exc) for plugin, exc in failures if plugin.rsplit(".", 1)[-1] in wanted]
    # "auto" only applies to plugin configuration files, "yaml" only to inventories; drop the
    # refusal of the one that does not apply.
    noise = ("no root 'plugin' key", "Plugin configuration YAML file, not YAML inventory")
    useful = [(plugin, exc) for plugin, exc in chosen if not any(n in _message(exc) for n in noise)]
    picked = useful or chosen or failures
    unique: dict[str, tuple[str, BaseException | str]] = {}
    for plugin, exc in picked:
        # auto and yaml report the same YAML syntax error; keep one, preferring one with a line number
        message = _message(exc)
        if message not in unique or (_line_number(exc) and not _line_number(unique[message][1])):
            unique[message] = (plugin, exc)
    return list(unique.values())


def _message(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error.strip()
    message = getattr(error, "message", None)
    text = message if isinstance(message, str) and message else str(error)
    return text.strip()


def _format_of(plugin: str) -> str:
    # "auto" reads YAML files that configure an inventory plugin; to the user it is YAML too
    short = plugin.rsplit(".", 1)[-1]
    known = {"ini": "INI", "yaml": "YAML", "auto": "YAML", "toml": "TOML"}
    return f"{known[short]} inventory" if short in known else f"inventory for the {plugin} plugin"


def _reason(error: BaseException | str) -> str:
    message = _message(error)
    if "Plugin configuration YAML file" in message:  # a `plugin:` file, which `auto` would have run
        return ("it configures an inventory plugin, and lmstack does not run inventory plugins (only static "
                "INI, YAML and TOML inventories are read)")
    # the ini plugin wraps its reason in "Failed to parse inventory: ..."; we already say that
    return re.sub(r"^Failed to parse inventory:\s*", "", message)


def _chain(error: BaseException | str) -> Iterator[BaseException | str]:
    """The error and what caused it: ansible often re-raises without the cause's file and line."""
    seen: set[int] = set()
    current: BaseException | str | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = None if isinstance(current, str) else (current.__cause__ or current.__context__)


def _line_number(error: BaseException | str) -> int:
    for link in _chain(error):
        line = getattr(getattr(link, "obj", None), "line_num", None)
        if isinstance(line, int) and line > 0:
            return line
    return 0


def _line_of(error: BaseException | str, paths: _PathNames) -> int:
    line = _line_number(error)
    if line:
        return line
    # ansible < 2.19 puts "PATH:LINE:" in the message
    match = re.search(re.escape(str(paths.root)) + r"/[^\s:'\"]+:(\d+)", _message(error))
    return int(match.group(1)) if match else 0


def _error(file: str, line: int, message: str) -> ManifestError:
    return ManifestError(file=file, line=line, path="", message=message)


class _PathNames:
    """Turns the temporary directory's paths in ansible's messages back into `inventory/...`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        names = {str(root), os.path.realpath(root)}
        self._pattern = re.compile("|".join(re.escape(name) for name in sorted(names, key=len, reverse=True)))
        self._find = re.compile(rf"(?:{self._pattern.pattern})/([^\s'\"]+?)(?=[\s'\":,]|$)")

    def rewrite(self, text: str) -> str:
        return self._pattern.sub(INVENTORY_DIR, text)

    def find(self, text: str) -> str | None:
        match = self._find.search(text)
        return match.group(1).rstrip(".") if match else None


# --- ansible's process-wide state --------------------------------------------------------------------


@dataclass
class _Capture:
    failures: list[tuple[str, BaseException | str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    omitted: set[str] = field(default_factory=set)  # variables that could not be made plain data


# ansible < 2.19 reports each plugin's failure as a warning with this text
_OLD_FAILURE = re.compile(r"Failed to parse (?P<src>.+?) with (?P<plugin>\S+) plugin: (?P<msg>.*)", re.DOTALL)
_NEW_FAILURE = re.compile(r"Failed to parse inventory with '(?P<plugin>[^']+)' plugin")


@contextmanager
def _captured(api: _Ansible) -> Iterator[_Capture]:
    """Collect ansible's warnings instead of printing them, and fail on any unparseable source."""
    capture = _Capture()

    def warning(msg: object, *args: object, **kwargs: object) -> None:
        text = str(msg).strip()
        old = _OLD_FAILURE.search(text)
        if old:
            capture.failures.append((old.group("plugin"), old.group("msg")))
        else:
            capture.warnings.append(text)

    def error_as_warning(msg: object, exception: BaseException, *args: object, **kwargs: object) -> None:
        new = _NEW_FAILURE.search(str(msg or ""))
        if new:
            capture.failures.append((new.group("plugin"), exception))
        else:
            capture.warnings.append(f"{msg}: {_message(exception)}" if msg else _message(exception))

    def deprecated(msg: object, *args: object, **kwargs: object) -> None:
        capture.warnings.append(f"deprecated: {msg}")

    display = api.Display()
    patches: dict[str, Any] = {
        "warning": warning,
        "error_as_warning": error_as_warning,
        "deprecated": deprecated,
    }
    # Unparseable inventory is an error, as with ansible-playbook's inventory_any_unparsed_is_failed.
    constants = {"INVENTORY_ANY_UNPARSED_IS_FAILED": True, "INVENTORY_UNPARSED_IS_FAILED": True}
    saved_display = {name: display.__dict__.get(name, _UNSET) for name in patches}
    saved_constants = {name: getattr(api.C, name, _UNSET) for name in constants}
    for name, patch in patches.items():
        setattr(display, name, patch)
    for name, value in constants.items():
        setattr(api.C, name, value)
    try:
        yield capture
    finally:
        for name, original in saved_display.items():
            if original is _UNSET:
                delattr(display, name)
            else:
                setattr(display, name, original)
        for name, original in saved_constants.items():
            if original is _UNSET:
                delattr(api.C, name)
            else:
                setattr(api.C, name, original)


_UNSET = object()


def _forget_paths(temp: str) -> None:
    """Drop host_group_vars' cache entries for our temporary directory.

    That plugin caches, per process and forever, which vars files a path holds (and which paths have
    none). Each parse uses a new temporary path, so without this a long-running server would grow the
    caches on every sync, and a reused temporary name would see stale entries.
    """
    names = (temp, os.path.realpath(temp))
    for module_name, module in list(sys.modules.items()):
        if not module_name.endswith("host_group_vars"):
            continue
        for attribute in ("FOUND", "CANONICAL_PATHS"):
            cache = getattr(module, attribute, None)
            if isinstance(cache, dict):
                for key in [k for k in cache if any(n in str(k) or n in str(cache[k]) for n in names)]:
                    del cache[key]
        missing = getattr(module, "NAK", None)
        if isinstance(missing, set):
            missing.difference_update({p for p in missing if any(n in str(p) for n in names)})


@dataclass(frozen=True)
class _Ansible:
    """The ansible names we use, imported on first need (importing ansible takes ~0.3 s)."""

    C: Any
    AnsibleError: type[Exception]
    DataLoader: Any
    StaticInventoryManager: Any  # ansible's InventoryManager with only the static formats enabled
    VariableManager: Any
    Display: Any


@functools.cache
def _ansible() -> _Ansible:
    # Importing ansible.constants creates its local temp dir (default ~/.ansible/tmp). Point it at the
    # system temp dir for the import only, so parsing never writes to the home directory; ansible
    # removes its ansible-local-* dir at exit. Set only for the import so ansible processes that
    # lmstack starts later see the user's environment unchanged.
    override = "ANSIBLE_LOCAL_TEMP" not in os.environ and "ansible.constants" not in sys.modules
    if override:
        os.environ["ANSIBLE_LOCAL_TEMP"] = tempfile.gettempdir()
    try:
        import ansible.constants as constants
        from ansible.errors import AnsibleError
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader
        from ansible.plugins.loader import inventory_loader
        from ansible.utils.display import Display
        from ansible.vars.manager import VariableManager
    finally:
        if override:
            del os.environ["ANSIBLE_LOCAL_TEMP"]

    class StaticInventoryManager(InventoryManager):  # type: ignore[misc]
        def _fetch_inventory_plugins(self) -> list[Any]:
            # Not ansible's default list (which has `auto` and `script`): files from Git are data.
            plugins = [inventory_loader.get(name) for name in STATIC_INVENTORY_PLUGINS]
            return [plugin for plugin in plugins if plugin]

    return _Ansible(
        C=constants,
        AnsibleError=AnsibleError,
        DataLoader=DataLoader,
        StaticInventoryManager=StaticInventoryManager,
        VariableManager=VariableManager,
        Display=Display,
    )
