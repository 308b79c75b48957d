"""The contract's CI checks: `buf lint` (the buf style guide) on protos/, and `buf breaking` guarding the
public meshserve.v1 API against its released descriptor image (protos/released/meshserve_v1.binpb).
buf comes from npm (@bufbuild/buf in clients/node, installed by `npm ci --prefix clients/node`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.conftest import REPO

NODE_PROJECT = REPO / "clients" / "node"
PROTOS = REPO / "protos"
RELEASED = PROTOS / "released" / "meshserve_v1.binpb"


@pytest.fixture(scope="module")
def buf():
    assert shutil.which("npx"), "npx (Node.js) is needed to run buf"
    assert (NODE_PROJECT / "node_modules" / "@bufbuild" / "buf").is_dir(), (
        "buf is not installed: run `npm ci --prefix clients/node` (make install does)"
    )

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        # --no-install: the locked local copy or nothing, never a download at test time
        return subprocess.run(
            ["npx", "--no-install", "buf", *map(str, args)],
            cwd=NODE_PROJECT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def copy_of_protos(tmp_path: Path) -> Path:
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy)
    return copy


def test_buf_lint_passes(buf):
    result = buf("lint", PROTOS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_style_violation(buf, tmp_path):
    protos = copy_of_protos(tmp_path)
    service = protos / "meshserve" / "v1" / "generation_service.proto"
    service.write_text(service.read_text() + "\n// Color is badly styled.\nenum Color {\n  // Red.\n  RED = 0;\n}\n")
    result = buf("lint", protos)
    assert result.returncode != 0
    assert 'Enum zero value name "RED" should be suffixed with "_UNSPECIFIED"' in result.stdout, result.stdout


def test_released_image_is_the_public_api(buf):
    image = descriptor_pb2.FileDescriptorSet.FromString(RELEASED.read_bytes())
    assert [f.name for f in image.file] == ["meshserve/v1/generation_service.proto"]
    released = next(m for m in image.file[0].message_type if m.name == "GenerateRequest")
    assert {f.name: f.number for f in released.field}["prompt"] == 2


def test_buf_breaking_passes_against_the_released_image(buf):
    result = buf("breaking", PROTOS, "--against", RELEASED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_renumbered_field(buf, tmp_path):
    protos = copy_of_protos(tmp_path)
    service = protos / "meshserve" / "v1" / "generation_service.proto"
    text = service.read_text()
    assert "string prompt = 2;" in text
    service.write_text(text.replace("string prompt = 2;", "string prompt = 12;"))
    result = buf("breaking", protos, "--against", RELEASED)
    assert result.returncode != 0
    assert "GenerateRequest" in result.stdout, result.stdout
