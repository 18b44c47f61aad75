"""CHANGELOG.md in the Keep a Changelog format, and the release notes the release workflow takes from it
(.github/scripts/release_notes.py; issue 24)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from types import ModuleType

import pytest

from tests.release.conftest import ROOT

SCRIPT = ROOT / ".github" / "scripts" / "release_notes.py"
#: Keep a Changelog 1.1.0's kinds of change.
KINDS = ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security")


def release_notes() -> ModuleType:
    spec = importlib.util.spec_from_file_location("release_notes", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def test_changelog_is_keep_a_changelog() -> None:
    notes = release_notes()
    text = (ROOT / "CHANGELOG.md").read_text()
    sections = notes.sections(text)
    assert sections[0].name == "Unreleased"
    assert sections[0].date is None
    released = sections[1:]
    assert released, "no release yet"
    for section in released:
        assert notes.VERSION.fullmatch(section.name), section
        assert section.date, section
    # Newest first, dates never going up.
    versions = [tuple(map(int, s.name.split("."))) for s in released]
    assert versions == sorted(versions, reverse=True)
    assert [s.date for s in released] == sorted((s.date for s in released), reverse=True)
    for section in sections:
        kinds = re.findall(r"^### (.*)$", section.body, flags=re.MULTILINE)
        if section is sections[0] and not section.body:
            continue  # Unreleased is empty right after a release
        assert kinds, f"{section.name}: no '### Added' (or another kind of change)"
        assert set(kinds) <= set(KINDS), f"{section.name}: {kinds} (Keep a Changelog: {KINDS})"
        assert len(kinds) == len(set(kinds)), f"{section.name}: a kind twice: {kinds}"


def test_release_notes_are_the_versions_section() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "0.1.0"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("The first version:")
    assert "### Added" in out
    assert "## [" not in out


@pytest.mark.parametrize(
    ("version", "problem"),
    [
        ("9.9.9", "CHANGELOG.md has no section for 9.9.9: move the Unreleased entries under '## [9.9.9]'"),
        ("v0.1.0", "not a release version X.Y.Z (the tag without its v): 'v0.1.0'"),
        ("Unreleased", "not a release version X.Y.Z (the tag without its v): 'Unreleased'"),
    ],
)
def test_a_tag_without_its_section_stops_the_release(version: str, problem: str) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), version], capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"release_notes: {problem}\n")


def test_an_undated_or_empty_section_is_refused() -> None:
    notes = release_notes()
    with pytest.raises(ValueError, match=r"the section of 1\.0\.0 has no date"):
        notes.notes("1.0.0", "# Changelog\n\n## [1.0.0]\n\n### Added\n\n- x\n")
    with pytest.raises(ValueError, match=r"the section of 1\.0\.0 is empty"):
        notes.notes("1.0.0", "## [1.0.0] - 2026-12-06\n\n## [0.9.0] - 2026-12-01\n\n- y\n")
    with pytest.raises(ValueError, match="not a release heading"):
        notes.sections("## 1.0.0\n")
