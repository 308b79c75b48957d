"""The layering contracts in pyproject.toml catch each kind of break they exist for (`make lint` runs
`lint-imports` over services/ itself: the layers of docs/architecture.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Runs the contracts of `root`/pyproject.toml over the `services` package under `root`."""
    # the checked copy comes first on the path, before the editable install's finder
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _append(path: Path, line: str) -> None:
    path.write_text((path.read_text() if path.exists() else "") + f"\n{line}\n")


def test_the_contracts_catch_a_crossed_layer_a_sibling_import_a_cycle_and_a_new_package(tmp_path: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    services = tmp_path / "services"
    shutil.copytree(REPO / "services", services, ignore=shutil.ignore_patterns("__pycache__"))
    # 1. a lower layer importing a higher one
    _append(services / "modelstore" / "layout.py", "import services.inference.sampling")
    # 2. two services importing each other's code instead of calling over gRPC
    _append(services / "tokenizer" / "core.py", "import services.router.stops")
    # 3. the OpenAI service reaching into the engine instead of calling the router
    _append(services / "openai" / "__init__.py", "import services.inference.engine")
    # 4. a cycle between two modules of one package (router.core imports router.stops)
    _append(services / "router" / "stops.py", "import services.router.core")
    # 5. a package that has no place in the layers
    (services / "extras").mkdir()
    (services / "extras" / "__init__.py").write_text("")

    result = lint_imports(tmp_path)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "services.modelstore.layout -> services.inference.sampling" in out
    assert "services.tokenizer.core -> services.router.stops" in out
    assert "services.openai -> services.inference.engine" in out
    assert "No cycles are allowed in services.router." in out and ".stops -> .core" in out
    assert "services.extras" in out
