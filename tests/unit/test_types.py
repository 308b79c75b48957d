"""The type-checking configuration does what pyproject.toml says: strict on common, router and
tokenizer, the defaults (with unannotated bodies checked) elsewhere. `make lint` runs mypy on services/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

MYPY = Path(sys.executable).with_name("mypy")


def test_the_strict_packages_are_held_to_more_than_the_rest(tmp_path: Path) -> None:
    # the configuration over two small modules of its own: the same lapses in common (strict) and in
    # inference (the defaults), and a wrong body without annotations, which the defaults check too
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    lapses = "def untyped(x):\n    return x\n\n\ndef wrong_body():\n    n: int = 'text'\n    return n\n"
    for package in ("", "common", "inference"):
        (tmp_path / "services" / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / "services" / package / "__init__.py").write_text("")
    (tmp_path / "services" / "common" / "probe.py").write_text(lapses)
    (tmp_path / "services" / "inference" / "probe.py").write_text(lapses)

    result = subprocess.run([str(MYPY), "--no-incremental"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    errors = [line for line in out.splitlines() if ": error: " in line]
    assert any(line.startswith("services/common/probe.py:1:") and "[no-untyped-def]" in line for line in errors), out
    assert not any(line.startswith("services/inference/probe.py:1:") for line in errors), out
    for package in ("common", "inference"):
        assert any(line.startswith(f"services/{package}/probe.py:6:") and "[assignment]" in line for line in errors), (
            out
        )
