"""Prints the release notes of a version: its section of CHANGELOG.md, without the heading (issue 24).

Usage: python .github/scripts/release_notes.py 1.2.3 > notes.md   (the release workflow, for the tag v1.2.3)

Exits 1 with one line naming the problem when the version is not X.Y.Z, or CHANGELOG.md has no dated section for
it, or that section is empty: a tag pushed before its changelog entry stops the release before anything is
published. tests/release/test_changelog.py checks CHANGELOG.md with the same parser.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

CHANGELOG = Path(__file__).resolve().parents[2] / "CHANGELOG.md"
VERSION = re.compile(r"\d+\.\d+\.\d+")
#: "## [1.2.3] - 2026-12-06" or "## [Unreleased]" (Keep a Changelog 1.1.0).
HEADING = re.compile(r"^## \[(?P<name>[^\]]+)\](?: - (?P<date>\d{4}-\d{2}-\d{2}))?\s*$")


@dataclass(frozen=True)
class Section:
    name: str  # "Unreleased" or a version
    date: str | None
    body: str


def sections(text: str) -> list[Section]:
    """The level-2 sections of a changelog, in order; a '## ' line that is not a release heading is an error."""
    found: list[Section] = []
    name, date, lines = "", None, list[str]()
    for line in [*text.splitlines(), "## [end]"]:
        if line.startswith("## "):
            match = HEADING.match(line)
            if match is None:
                raise ValueError(f"CHANGELOG.md: not a release heading ('## [X.Y.Z] - YYYY-MM-DD'): {line!r}")
            if name:
                found.append(Section(name, date, "\n".join(lines).strip()))
            name, date, lines = match["name"], match["date"], []
        elif name:
            lines.append(line)
    return found


def notes(version: str, text: str) -> str:
    if not VERSION.fullmatch(version):
        raise ValueError(f"not a release version X.Y.Z (the tag without its v): {version!r}")
    for section in sections(text):
        if section.name == version:
            if section.date is None:
                raise ValueError(f"CHANGELOG.md: the section of {version} has no date ('## [{version}] - YYYY-MM-DD')")
            if not section.body:
                raise ValueError(f"CHANGELOG.md: the section of {version} is empty")
            return section.body
    raise ValueError(f"CHANGELOG.md has no section for {version}: move the Unreleased entries under '## [{version}]'")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        print(notes(argv[0], CHANGELOG.read_text(encoding="utf-8")))
    except ValueError as exc:
        print(f"release_notes: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
