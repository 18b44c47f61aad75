"""lumberjack's backup names, and listing a log's rotated siblings (fluent-bit: tail_scan.c)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Sibling", "go_ext", "list_siblings", "sibling_pattern", "specs"]

#: lumberjack's backup time format "2006-01-02T15-04-05.000" (UTC unless LocalTime is set).
#: Fixed width, so the lexicographic order of the names is their chronological order.
_TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d{1,9})?"


def go_ext(name: str) -> tuple[str, str]:
    """(prefix, ext) as lumberjack splits a name: Go's filepath.Ext, the suffix from the last dot."""
    dot = name.rfind(".")
    return (name, "") if dot < 0 else (name[:dot], name[dot:])


def sibling_pattern(name: str) -> re.Pattern[str]:
    prefix, ext = go_ext(name)
    return re.compile(rf"{re.escape(prefix)}-(?P<ts>{_TIMESTAMP}){re.escape(ext)}(?P<gz>\.gz)?")


@dataclass(frozen=True, slots=True)
class Sibling:
    path: Path
    ts: str
    gz: bool


def specs(path: Path) -> list[tuple[Path, re.Pattern[str]]]:
    """Where backups are: next to the configured path, and next to its target if it is a symlink."""
    specs = [(path.parent, sibling_pattern(path.name))]
    real = Path(os.path.realpath(path))
    if real.parent != Path(os.path.realpath(path.parent)):
        specs.append((real.parent, sibling_pattern(real.name)))
    elif real.name != path.name:
        specs.append((path.parent, sibling_pattern(real.name)))
    return specs

def list_siblings(path: Path) -> list[Sibling]:
    """Rotated backups, oldest first; a plain file wins over a .gz of the same time (lumberjack removes
    the plain file only once the .gz is complete). Blocking."""
    found: dict[tuple[str, str], Sibling] = {}
    for directory, pattern in specs(path):
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        real_dir = os.path.realpath(directory)
        for entry in entries:
            m = pattern.fullmatch(entry.name)
            if m is None:
                continue
            key = (real_dir, m["ts"])
            sibling = Sibling(Path(entry.path), m["ts"], m["gz"] is not None)
            if key not in found or found[key].gz:
                found[key] = sibling
    return sorted(found.values(), key=lambda s: (s.ts, str(s.path)))
