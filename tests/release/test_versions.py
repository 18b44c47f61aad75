"""The version from git (setuptools-scm, pyproject.toml's [tool.setuptools_scm]): what a tagged checkout, CI's
clone without tags and a tree without git each build (issue 24). The tagged build itself, installed and run, is
tests/release/test_artefacts.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pyforward import UNKNOWN_VERSION
from tests.release.conftest import TAG, clone_working_tree, git, scm_version


@pytest.fixture(scope="module")
def untagged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clone_working_tree(tmp_path_factory.mktemp("versions") / "clone")


def test_a_tag_is_the_version(tmp_path: Path, untagged: Path) -> None:
    tagged = tmp_path / "tagged"
    git(tmp_path, "clone", "--quiet", str(untagged), str(tagged))
    git(tagged, "tag", "--annotate", TAG, "--message", "test")
    assert scm_version(tagged) == TAG.removeprefix("v")
    # A commit after the tag is the next patch release's development version, never the tag's.
    (tagged / "after-the-tag").write_text("x\n")
    git(tagged, "add", "after-the-tag")
    git(tagged, "commit", "--quiet", "--message", "after the tag")
    assert re.fullmatch(r"9\.9\.10\.dev1\+g[0-9a-f]+", scm_version(tagged)), scm_version(tagged)


def test_a_clone_without_tags_is_a_dev_version_naming_its_commit(untagged: Path) -> None:
    """CI's fresh clone has no tags: the version says so (a development release, the commit in its local part)."""
    version = scm_version(untagged)
    head = git(untagged, "rev-parse", "--short=7", "HEAD")
    assert re.fullmatch(r"0\.\d+(\.\d+)?\.dev\d+\+[a-z0-9.]*g[0-9a-f]+", version), version
    assert f"g{head}" in version, (version, head)


def test_a_tree_without_git_is_unknown(tmp_path: Path, untagged: Path) -> None:
    """No .git at all (a copied source tree, the image's build context without a VERSION): the fallback version."""
    tree = tmp_path / "tree"
    shutil.copytree(untagged, tree, ignore=shutil.ignore_patterns(".git"))
    # The same words as an uninstalled pyforward's __version__ (PYTHONPATH=src).
    assert scm_version(tree) == UNKNOWN_VERSION == "0.0.0+unknown"
