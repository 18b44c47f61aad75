"""docs/configuration.md is generated from the settings model; it must match what the model renders now."""

from __future__ import annotations

from pathlib import Path

from pyforward import docgen
from pyforward.envnames import LEGACY_ENV, LEGACY_IGNORED
from pyforward.settings import Settings, env_name

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_reference_is_fresh() -> None:
    assert DOC.exists(), "docs/configuration.md is missing: run python -m pyforward.docgen -o docs/configuration.md"
    assert DOC.read_text(encoding="utf-8") == docgen.render(), (
        "docs/configuration.md is stale: run `python -m pyforward.docgen -o docs/configuration.md`"
    )


def test_reference_names_every_setting_and_every_old_name() -> None:
    text = docgen.render()
    for name in Settings.model_fields:
        assert f"| `{env_name(name)}` |" in text, name
    for old, _, _ in LEGACY_ENV:
        assert f"`{old}`" in text
    for old in LEGACY_IGNORED:
        assert f"`{old}`" in text


def test_render_does_not_depend_on_the_host(monkeypatch) -> None:
    first = docgen.render()
    monkeypatch.setattr("socket.gethostname", lambda: "some-other-host")
    monkeypatch.setenv("PYFORWARD_PORT", "1")
    monkeypatch.setenv("AUDIT_NAMESPACE", "elsewhere")
    assert docgen.render() == first


def test_check_mode_reports_stale_file(tmp_path: Path, capsys) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n", encoding="utf-8")
    assert docgen.main(["--check", str(stale)]) == 1
    assert "is stale" in capsys.readouterr().err
    assert docgen.main(["-o", str(stale)]) == 0
    assert docgen.main(["--check", str(stale)]) == 0
