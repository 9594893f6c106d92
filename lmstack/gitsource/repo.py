"""Read the fleet's files from one Git commit (or a plain folder); the only module that imports `git`.

Files always come from the commit's tree, never from a working tree, so what is applied is exactly
what a SHA names. Remote repositories are fetched into a bare cache clone under `cache_dir` on every
read, so a push is seen by the next read.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from git import Blob, Repo, Tree
from git.exc import GitCommandError, InvalidGitRepositoryError, NoSuchPathError

MANIFESTS_DIR = "manifests"
INVENTORY_DIR = "inventory"
_SOURCE_DIRS = (MANIFESTS_DIR, INVENTORY_DIR)

# Branches land in the remote-tracking namespace (not refs/heads) so a branch name is always resolved
# against what the remote has; refs/pull/* and other server-side refs are not fetched.
_FETCH_REFSPECS = ("+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*")
_REMOTE_BRANCHES = "refs/remotes/origin/"
_FETCH_TIMEOUT_S = 600.0  # a hung network must not block the controller forever
# Never wait for a password on a terminal: a server has no one to type it.
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0"}
_FALLBACK_IDENTITY = {
    "GIT_AUTHOR_NAME": "lmstack",
    "GIT_AUTHOR_EMAIL": "lmstack@localhost",
    "GIT_COMMITTER_NAME": "lmstack",
    "GIT_COMMITTER_EMAIL": "lmstack@localhost",
}
_SYMLINK_HOPS = 8
_LISTED_BRANCHES = 5


class SourceError(Exception):
    """The repository, ref or folder cannot be read; the message says what to do."""


@dataclass(frozen=True)
class Revision:
    sha: str
    subject: str
    author: str  # "Name <email>"
    committed_at: datetime  # timezone-aware, in the committer's offset


@dataclass(frozen=True)
class Snapshot:
    """Every file under manifests/ and inventory/, keyed by repository-relative POSIX path."""

    files: Mapping[str, bytes]
    revision: Revision | None
    origin: str  # the repository path, URL (credentials removed) or folder it came from


def read_commit(repo: str, ref: str, *, cache_dir: Path) -> Snapshot:
    """The files of the commit that `ref` names in `repo` (a local path or a URL)."""
    if ref.startswith("-") or not ref.strip():
        raise SourceError(f"invalid ref {ref!r}")
    if is_url(repo):
        return _read_remote(repo, ref, cache_dir)
    path = Path(repo).expanduser().resolve()
    with _open_local(path) as git_repo:
        sha = _resolve(git_repo, ref, candidates=[ref], origin=str(path), remote=False)
        return _snapshot(git_repo, sha, str(path))


def read_directory(path: Path) -> Snapshot:
    """The same files read from a plain folder (uncommitted edits included); revision is None."""
    root = path.expanduser().resolve()
    if not root.is_dir():
        raise SourceError(f"{path} is not a folder")
    if not (root / MANIFESTS_DIR).is_dir():
        raise SourceError(f"{root} has no {MANIFESTS_DIR}/ folder")
    files: dict[str, bytes] = {}
    for top in _SOURCE_DIRS:
        base = root / top
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                file = Path(dirpath, name)
                if file.is_file():  # follows file symlinks, skips dangling ones and sockets
                    files[file.relative_to(root).as_posix()] = file.read_bytes()
    return Snapshot(files=MappingProxyType(dict(sorted(files.items()))), revision=None, origin=str(root))


def init_repository(path: Path, message: str) -> str:
    """`git init` (branch main), add everything, commit; returns the new commit's SHA."""
    try:
        repo = Repo.init(path, initial_branch="main")
    except GitCommandError as error:
        raise SourceError(f"git init {path} failed: {_stderr_text(error.stderr)}") from error
    with repo:
        repo.git.add("--all")
        env = {} if _has_identity(repo) else _FALLBACK_IDENTITY
        status, out, err = repo.git.execute(
            ["git", "commit", "--quiet", "-m", message],
            env=env,
            with_extended_output=True,
            with_exceptions=False,
        )
        if status != 0:
            # "nothing to commit" comes on stdout
            raise SourceError(f"git commit in {path} failed: {err.strip() or out.strip()}")
        return repo.head.commit.hexsha


def is_url(repo: str) -> bool:
    """Git's own rule: `scheme://...`, or scp-like `[user@]host:path` with no slash before the colon."""
    if "://" in repo:
        return True
    colon = repo.find(":")
    return colon > 0 and "/" not in repo[:colon]


def redact(text: str) -> str:
    """Remove `user:password@` (or a token) from every URL in `text`."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", text)


# --- reading a commit ------------------------------------------------------------------------------


@contextmanager
def _open_local(path: Path) -> Iterator[Repo]:
    """Open a local repository (normal or bare) with a clear error when it is not one."""
    if not path.exists():
        raise SourceError(f"{path} does not exist")
    try:
        repo = Repo(path)
    except (InvalidGitRepositoryError, NoSuchPathError) as error:
        hint = f"to read a plain folder, use --dir {path}"
        raise SourceError(f"{path} is not a git repository ({hint})") from error
    try:
        yield repo
    finally:
        repo.close()  # ends GitPython's persistent `git cat-file` processes


def _snapshot(repo: Repo, sha: str, origin: str) -> Snapshot:
    commit = repo.commit(sha)
    tree = commit.tree
    short = sha[:12]
    try:
        manifests = tree / MANIFESTS_DIR
    except KeyError:
        manifests = None
    if not isinstance(manifests, Tree):
        raise SourceError(f"commit {short} of {origin} has no {MANIFESTS_DIR}/ folder")
    files: dict[str, bytes] = {}
    for top in _SOURCE_DIRS:
        try:
            subtree = tree / top
        except KeyError:
            continue
        if isinstance(subtree, Tree):
            for blob in _blobs(subtree):
                data = _blob_data(tree, blob)
                if data is not None:
                    files[str(blob.path)] = data
    author = f"{commit.author.name} <{commit.author.email}>"
    summary = commit.summary
    revision = Revision(
        sha=commit.hexsha,
        subject=summary if isinstance(summary, str) else summary.decode("utf-8", "replace"),
        author=author,
        committed_at=commit.committed_datetime,
    )
    return Snapshot(files=MappingProxyType(dict(sorted(files.items()))), revision=revision, origin=origin)


def _blobs(tree: Tree) -> Iterator[Blob]:
    for item in tree.traverse():
        if isinstance(item, Blob):  # submodules (gitlinks) have no content here and are skipped
            yield item


def _blob_data(root: Tree, blob: Blob) -> bytes | None:
    """A file's bytes; a symlink is followed inside the commit (as a checkout would), else skipped."""
    for _ in range(_SYMLINK_HOPS):
        if not stat.S_ISLNK(blob.mode):
            data: bytes = blob.data_stream.read()
            return data
        target = blob.data_stream.read().decode("utf-8", "surrogateescape")
        resolved = _join_inside(PurePosixPath(blob.path).parent, target)
        if resolved is None:
            return None
        try:
            item = root / resolved
        except KeyError:
            return None
        if not isinstance(item, Blob):
            return None
        blob = item
    return None


def _join_inside(base: PurePosixPath, target: str) -> str | None:
    if target.startswith("/"):
        return None
    parts: list[str] = []
    for part in (*base.parts, *PurePosixPath(target).parts):
        if part == "..":
            if not parts:
                return None  # points outside the repository
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts) or None


def _resolve(repo: Repo, ref: str, *, candidates: list[str], origin: str, remote: bool) -> str:
    """The commit SHA of the first candidate git can resolve (tags are peeled to their commit)."""
    for candidate in candidates:
        status, out, err = repo.git.execute(
            ["git", "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"],
            with_extended_output=True,
            with_exceptions=False,
        )
        if status == 0 and out.strip():
            return out.strip()
        if status != 0 and err.strip():
            # --quiet silences "unknown revision"; anything said is another problem, e.g. git refusing
            # a repository owned by another user (safe.directory)
            raise SourceError(f"git cannot read {origin}: {redact(err.strip())}")
    branches = _branches(repo, remote=remote)
    if not branches:
        raise SourceError(f"unknown ref {ref!r} in {origin}: it has no branches (no commits yet?)")
    listed = ", ".join(branches[:_LISTED_BRANCHES])
    more = f" and {len(branches) - _LISTED_BRANCHES} more" if len(branches) > _LISTED_BRANCHES else ""
    raise SourceError(f"unknown ref {ref!r} in {origin}; branches: {listed}{more}")


def _branches(repo: Repo, *, remote: bool) -> list[str]:
    namespace = _REMOTE_BRANCHES if remote else "refs/heads/"
    status, out, _ = repo.git.execute(
        ["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)", namespace],
        with_extended_output=True,
        with_exceptions=False,
    )
    if status != 0:
        return []
    return [line[len(namespace) :] for line in out.splitlines() if line.startswith(namespace)]


# --- remote repositories ---------------------------------------------------------------------------


def _read_remote(url: str, ref: str, cache_dir: Path) -> Snapshot:
    origin = redact(url)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(url.encode()).hexdigest()[:20]
    path = cache_dir / key
    # One process at a time per cache: concurrent fetches into one repository fail on ref locks.
    with (cache_dir / f"{key}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        created = not (path / "HEAD").exists()
        if created:
            _create_cache(path, url)
        with _open_local(path) as repo:
            try:
                _fetch(repo, origin)
            except SourceError:
                if created:  # a URL that never worked leaves nothing behind
                    shutil.rmtree(path, ignore_errors=True)
                raise
            if ref == "HEAD":
                candidates = [_remote_head(repo, origin)]
            else:
                # git's own order for a short name (tags before branches), then anything rev-parse takes
                candidates = [f"refs/tags/{ref}", f"{_REMOTE_BRANCHES}{ref}", ref]
            sha = _resolve(repo, ref, candidates=candidates, origin=origin, remote=True)
            return _snapshot(repo, sha, origin)


def _create_cache(path: Path, url: str) -> None:
    # Built beside its final place and renamed, so an interrupted start never leaves a half-made cache.
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        repo = Repo.init(staging, bare=True)
        with repo, repo.config_writer() as config:
            # Written to the config, not passed as an argument, so a URL's credentials never show in `ps`.
            config.set_value('remote "origin"', "url", url)
            # gc in the foreground, under our lock: no background process left behind in the cache
            config.set_value("gc", "autoDetach", "false")
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fetch(repo: Repo, origin: str) -> None:
    status, _, err = repo.git.execute(
        ["git", "fetch", "--quiet", "--prune", "--force", "origin", *_FETCH_REFSPECS],
        with_extended_output=True,
        with_exceptions=False,
        kill_after_timeout=_FETCH_TIMEOUT_S,
        env=_GIT_ENV,
    )
    if status != 0:
        detail = redact(err.replace("\r\n", "\n").strip()) or f"git exited with {status}"
        raise SourceError(f"fetching {origin} failed: {detail}")


def _remote_head(repo: Repo, origin: str) -> str:
    """The remote's default branch, as our remote-tracking ref (HEAD itself is not fetched)."""
    status, out, err = repo.git.execute(
        ["git", "ls-remote", "--symref", "origin", "HEAD"],
        with_extended_output=True,
        with_exceptions=False,
        kill_after_timeout=_FETCH_TIMEOUT_S,
        env=_GIT_ENV,
    )
    if status != 0:
        raise SourceError(f"reading HEAD of {origin} failed: {redact(err.strip())}")
    sha = ""
    for line in out.splitlines():
        target, _, name = line.partition("\t")
        if name != "HEAD":
            continue
        if target.startswith("ref: refs/heads/"):
            return _REMOTE_BRANCHES + target[len("ref: refs/heads/") :]
        sha = target
    if sha:
        return sha  # a server that does not advertise the symref
    raise SourceError(f"{origin} has no HEAD (its default branch has no commits); pass a branch as the ref")


# --- small helpers ---------------------------------------------------------------------------------


def _has_identity(repo: Repo) -> bool:
    """Whether git has a configured (not guessed) author and committer identity for this repo."""
    for variable in ("GIT_AUTHOR_IDENT", "GIT_COMMITTER_IDENT"):
        status, _, _ = repo.git.execute(
            ["git", "-c", "user.useConfigOnly=true", "var", variable],
            with_extended_output=True,
            with_exceptions=False,
        )
        if status != 0:
            return False
    return True


def _stderr_text(stderr: str | bytes | None) -> str:
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    text = (stderr or "").strip()
    # GitPython wraps stderr as "stderr: '...'"
    match = re.fullmatch(r"stderr: '(.*)'", text, re.DOTALL)
    return redact(match.group(1).strip() if match else text)
