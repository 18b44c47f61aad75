"""Fixtures of the release checks: clones of this repository as CI and a release would see them (issue 24)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The tag the release checks put on their clone: no real release will have it.
TAG = "v9.9.9"
#: A commit needs an author; the developer's git may have none configured (CI's has not).
GIT_IDENTITY = ("-c", "user.name=pyforward tests", "-c", "user.email=tests@pyforward.invalid")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *GIT_IDENTITY, *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def clone_working_tree(target: Path, *, tag: str | None = None) -> Path:
    """A clone of this repository without its tags, holding the working tree as it is now (committed on top of
    HEAD when it differs), tagged ``tag`` when given.

    The working tree, not HEAD: a file added to the package but not committed yet is what the check is about. Tags
    are left out, as in CI's fresh clone (the version tests say what a clone without tags builds).
    """
    git(ROOT.parent, "clone", "--quiet", "--no-tags", str(ROOT), str(target))
    listed = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--deduplicate")
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # (a file deleted but not yet staged is listed too: it is removed below)
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    for name in filter(None, git(ROOT, "ls-files", "-z", "--deleted").split("\0")):
        (target / name).unlink(missing_ok=True)
    git(target, "add", "--all")
    if git(target, "status", "--porcelain"):
        git(target, "commit", "--quiet", "--no-verify", "--message", "the working tree")
    if tag is not None:
        git(target, "tag", "--annotate", tag, "--message", f"test release {tag}")
    return target


def scm_version(tree: Path) -> str:
    """What setuptools-scm says the version of ``tree`` is, with pyproject.toml's configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SETUPTOOLS_SCM_PRETEND_VERSION")}
    return subprocess.run(
        [sys.executable, "-m", "setuptools_scm"], cwd=tree, env=env, capture_output=True, text=True, check=True,
        timeout=120,
    ).stdout.strip()
