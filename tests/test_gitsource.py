"""The Git source against real repositories made with the git CLI in tmp_path."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from lmstack.config import Settings
from lmstack.gitsource import (
    SourceError,
    init_repository,
    load_source,
    read_commit,
    read_directory,
)
from lmstack.manifests.errors import ManifestValidationError

WORKER = b"""\
apiVersion: lmstack.dev/v1
kind: Worker
metadata: {name: gpu-a}
spec: {host: gpu-a}
"""
HOSTS = b"[gpu]\ngpu-a ansible_host=10.0.0.1\n"


@pytest.fixture(autouse=True)
def git_identity(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tests see neither the machine's git config nor its identity, only this one.
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / "gitconfig"))
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Test Author")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "test@example.com")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def commit(repo: Path, files: dict[str, bytes], message: str) -> str:
    write(repo, files)
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def new_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "--quiet", "--initial-branch=main")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = new_repo(tmp_path / "fleet")
    commit(path, {"manifests/workers.yaml": WORKER, "inventory/hosts.ini": HOSTS}, "first fleet")
    return path


def test_reads_the_commit_not_the_working_tree(repo: Path, tmp_path: Path) -> None:
    sha = git(repo, "rev-parse", "HEAD")
    (repo / "manifests/workers.yaml").write_bytes(b"edited, not committed")
    (repo / "manifests/untracked.yaml").write_bytes(b"untracked")
    (repo / "inventory/hosts.ini").write_bytes(b"staged")
    git(repo, "add", "inventory/hosts.ini")

    snapshot = read_commit(str(repo), "main", cache_dir=tmp_path / "cache")

    assert dict(snapshot.files) == {"inventory/hosts.ini": HOSTS, "manifests/workers.yaml": WORKER}
    assert snapshot.revision is not None
    assert snapshot.revision.sha == sha
    assert snapshot.revision.subject == "first fleet"
    assert snapshot.revision.author == "Test Author <test@example.com>"
    assert isinstance(snapshot.revision.committed_at, datetime)
    assert snapshot.revision.committed_at.tzinfo is not None
    assert snapshot.origin == str(repo.resolve())
    assert not (tmp_path / "cache").exists()  # a local repository needs no cache


def test_only_manifests_and_inventory_are_read_recursively(repo: Path, tmp_path: Path) -> None:
    commit(
        repo,
        {
            "manifests/team/a/models.yml": b"x: 1\n",
            "inventory/group_vars/all.yml": b"site: ams\n",
            "README.md": b"not part of the fleet",
            "playbooks/site.yml": b"- hosts: all\n",
        },
        "more files",
    )
    snapshot = read_commit(str(repo), "HEAD", cache_dir=tmp_path)
    assert sorted(snapshot.files) == [
        "inventory/group_vars/all.yml",
        "inventory/hosts.ini",
        "manifests/team/a/models.yml",
        "manifests/workers.yaml",
    ]


def test_branch_tag_head_and_shas(repo: Path, tmp_path: Path) -> None:
    first = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "-a", "v1", "-m", "release 1")
    second = commit(repo, {"manifests/workers.yaml": b"second\n"}, "second: change workers")
    git(repo, "checkout", "--quiet", "-b", "dev")
    third = commit(repo, {"manifests/extra.yaml": b"dev only\n"}, "third on dev")
    git(repo, "checkout", "--quiet", "main")

    def read(ref: str) -> tuple[str, str, dict[str, bytes]]:
        snapshot = read_commit(str(repo), ref, cache_dir=tmp_path)
        assert snapshot.revision is not None
        return snapshot.revision.sha, snapshot.revision.subject, dict(snapshot.files)

    assert read("main")[:2] == (second, "second: change workers")
    assert read("HEAD")[0] == second
    sha, subject, files = read("dev")
    assert (sha, subject) == (third, "third on dev")
    assert files["manifests/extra.yaml"] == b"dev only\n"
    sha, subject, files = read(first)
    assert (sha, subject) == (first, "first fleet")
    assert files["manifests/workers.yaml"] == WORKER
    assert "manifests/extra.yaml" not in files
    assert read(first[:7])[0] == first
    assert read("v1")[0] == first  # an annotated tag is peeled to its commit
    assert read("dev~1")[0] == second


def test_bare_repository_path(repo: Path, tmp_path: Path) -> None:
    bare = tmp_path / "fleet.git"
    git(tmp_path, "clone", "--quiet", "--bare", str(repo), str(bare))
    snapshot = read_commit(str(bare), "main", cache_dir=tmp_path / "cache")
    assert snapshot.files["manifests/workers.yaml"] == WORKER


def test_remote_url_is_cached_and_fetched_on_every_read(tmp_path: Path) -> None:
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "--quiet", "--bare", "--initial-branch=main", str(origin))
    work = new_repo(tmp_path / "work")
    git(work, "remote", "add", "origin", str(origin))
    first = commit(work, {"manifests/workers.yaml": WORKER, "inventory/hosts.ini": HOSTS}, "first")
    git(work, "push", "--quiet", "origin", "main")
    url = origin.as_uri()  # file:///...
    cache = tmp_path / "cache"

    snapshot = read_commit(url, "main", cache_dir=cache)
    assert snapshot.revision is not None and snapshot.revision.sha == first
    assert snapshot.origin == url
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1

    second = commit(work, {"manifests/workers.yaml": b"pushed later\n"}, "second")
    git(work, "push", "--quiet", "origin", "main")
    git(work, "push", "--quiet", "origin", "main:feature")
    git(work, "tag", "v2")
    git(work, "push", "--quiet", "origin", "v2")

    snapshot = read_commit(url, "main", cache_dir=cache)
    assert snapshot.revision is not None and snapshot.revision.sha == second
    assert snapshot.files["manifests/workers.yaml"] == b"pushed later\n"
    for ref in ("HEAD", "feature", "v2", second, second[:8], "origin/main"):
        again = read_commit(url, ref, cache_dir=cache)
        assert again.revision is not None and again.revision.sha == second, ref
    assert read_commit(url, first, cache_dir=cache).files["manifests/workers.yaml"] == WORKER

    # A branch deleted on the remote is gone after the next fetch (prune).
    git(work, "push", "--quiet", "origin", "--delete", "feature")
    with pytest.raises(SourceError, match="unknown ref 'feature'"):
        read_commit(url, "feature", cache_dir=cache)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1


def test_unknown_ref_lists_branches(repo: Path, tmp_path: Path) -> None:
    git(repo, "branch", "staging")
    with pytest.raises(SourceError) as error:
        read_commit(str(repo), "nope", cache_dir=tmp_path)
    message = str(error.value)
    assert "unknown ref 'nope'" in message
    assert "main" in message and "staging" in message


def test_unknown_ref_in_a_repository_without_commits(tmp_path: Path) -> None:
    empty = new_repo(tmp_path / "empty")
    with pytest.raises(SourceError, match="no branches"):
        read_commit(str(empty), "HEAD", cache_dir=tmp_path)


def test_option_like_ref_is_rejected(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="invalid ref"):
        read_commit(str(repo), "--output=/tmp/x", cache_dir=tmp_path)


def test_plain_folder_is_not_a_repository(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    write(folder, {"manifests/workers.yaml": WORKER})
    with pytest.raises(SourceError, match=r"not a git repository.*--dir"):
        read_commit(str(folder), "main", cache_dir=tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        read_commit(str(tmp_path / "missing"), "main", cache_dir=tmp_path)


def test_commit_without_manifests_folder(tmp_path: Path) -> None:
    path = new_repo(tmp_path / "r")
    sha = commit(path, {"inventory/hosts.ini": HOSTS}, "inventory only")
    with pytest.raises(SourceError, match=rf"commit {sha[:12]} .* has no manifests/ folder"):
        read_commit(str(path), "main", cache_dir=tmp_path)


def test_fetch_failure_names_the_url_without_credentials(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as error:
        read_commit("https://user:s3cret@127.0.0.1:1/fleet.git", "main", cache_dir=tmp_path)
    message = str(error.value)
    assert message.startswith("fetching https://***@127.0.0.1:1/fleet.git failed:")
    assert "s3cret" not in message
    with pytest.raises(SourceError, match=r"fetching file://.*missing\.git failed: .+"):
        read_commit((tmp_path / "missing.git").as_uri(), "main", cache_dir=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no cache left for URLs that never worked


def test_symlinks_are_followed_inside_the_commit(repo: Path, tmp_path: Path) -> None:
    (repo / "manifests/alias.yaml").symlink_to("workers.yaml")
    (repo / "manifests/outside.yaml").symlink_to("../../elsewhere.yaml")
    commit(repo, {}, "links")
    files = read_commit(str(repo), "main", cache_dir=tmp_path).files
    assert files["manifests/alias.yaml"] == WORKER
    assert "manifests/outside.yaml" not in files


def test_read_directory_reads_uncommitted_files(repo: Path) -> None:
    (repo / "manifests/workers.yaml").write_bytes(b"edited")
    write(repo, {"inventory/host_vars/gpu-a.yml": b"rack: r2\n", "notes.txt": b"ignored"})
    snapshot = read_directory(repo)
    assert snapshot.revision is None
    assert snapshot.origin == str(repo.resolve())
    assert dict(snapshot.files) == {
        "inventory/host_vars/gpu-a.yml": b"rack: r2\n",
        "inventory/hosts.ini": HOSTS,
        "manifests/workers.yaml": b"edited",
    }


def test_read_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a folder"):
        read_directory(tmp_path / "missing")
    with pytest.raises(SourceError, match="no manifests/ folder"):
        read_directory(tmp_path)


def test_init_repository_commits_everything(tmp_path: Path) -> None:
    path = tmp_path / "new"
    write(path, {"manifests/workers.yaml": WORKER, "inventory/hosts.ini": HOSTS, ".gitignore": b"*.log\n"})
    write(path, {"debug.log": b"ignored by .gitignore"})
    sha = init_repository(path, "lmstack init")

    assert git(path, "rev-parse", "HEAD") == sha
    assert git(path, "rev-list", "--count", "HEAD") == "1"
    assert git(path, "branch", "--show-current") == "main"
    assert git(path, "log", "-1", "--format=%s|%an <%ae>") == "lmstack init|Test Author <test@example.com>"
    assert git(path, "ls-tree", "-r", "--name-only", "HEAD").splitlines() == [
        ".gitignore",
        "inventory/hosts.ini",
        "manifests/workers.yaml",
    ]
    revision = read_commit(str(path), "main", cache_dir=tmp_path).revision
    assert revision is not None and revision.sha == sha


def test_init_repository_without_an_identity_uses_lmstack_for_that_commit_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.delenv(f"GIT_{role}_NAME")
        monkeypatch.delenv(f"GIT_{role}_EMAIL")
    monkeypatch.delenv("EMAIL", raising=False)
    path = tmp_path / "new"
    write(path, {"manifests/workers.yaml": WORKER})
    init_repository(path, "lmstack init")
    assert git(path, "log", "-1", "--format=%an <%ae>|%cn <%ce>") == (
        "lmstack <lmstack@localhost>|lmstack <lmstack@localhost>"
    )
    with pytest.raises(subprocess.CalledProcessError):
        git(path, "config", "user.name")  # nothing was written to the repository's config


def test_init_repository_of_an_empty_folder_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="nothing to commit"):
        init_repository(tmp_path / "empty", "lmstack init")


def test_load_source_from_repo_and_directory(repo: Path, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    source = load_source(repo=str(repo), ref="main", directory=None, settings=settings)
    assert set(source.desired.workers) == {"gpu-a"}
    assert source.inventory.hosts["gpu-a"].address == "10.0.0.1"
    assert source.revision is not None and source.revision.subject == "first fleet"

    source = load_source(repo=None, ref="main", directory=repo, settings=settings)
    assert source.revision is None
    assert source.origin == str(repo.resolve())


def test_load_source_remote_uses_the_settings_cache(repo: Path, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    source = load_source(repo=repo.as_uri(), ref="main", directory=None, settings=settings)
    assert set(source.inventory.hosts) == {"gpu-a"}
    assert any(settings.repo_cache_dir.iterdir())


def test_load_source_reports_inventory_and_manifest_errors_together(tmp_path: Path) -> None:
    folder = tmp_path / "fleet"
    write(
        folder,
        {
            "manifests/workers.yaml": WORKER.replace(b"{name: gpu-a}", b"{name: gpu-a, nope: 1}"),
            "manifests/notes.txt": b"not a manifest: ignored",
            "inventory/hosts.ini": b"[gpu:wrong]\ngpu-a\n",
        },
    )
    settings = Settings(home=tmp_path / "home")
    with pytest.raises(ManifestValidationError) as error:
        load_source(repo=None, ref="main", directory=folder, settings=settings)
    files = {e.file for e in error.value.errors}
    assert files == {"inventory/hosts.ini", "manifests/workers.yaml"}


def test_load_source_checks_workers_against_the_inventory(tmp_path: Path) -> None:
    folder = tmp_path / "fleet"
    write(folder, {"manifests/workers.yaml": WORKER, "inventory/hosts.ini": b"[gpu]\ngpu-b\n"})
    with pytest.raises(ManifestValidationError, match="gpu-a"):
        load_source(repo=None, ref="main", directory=folder, settings=Settings(home=tmp_path))


def test_load_source_needs_exactly_one_of_repo_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        load_source(repo=None, ref="main", directory=None, settings=Settings(home=tmp_path))
    with pytest.raises(ValueError, match="exactly one"):
        load_source(repo="x", ref="main", directory=tmp_path, settings=Settings(home=tmp_path))
