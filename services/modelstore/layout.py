"""Reads a prepared model directory (written by prepare.py) for the services."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from services.modelstore.decoder_contract import LlamaConfig

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ModelDirectory:
    """A prepared model directory."""

    path: Path

    @staticmethod
    def is_complete(path: Path, source_sha256: str, export_version: int) -> bool:
        manifest = path / MANIFEST_NAME
        if not manifest.exists():
            return False
        data = json.loads(manifest.read_text())
        return data["source"]["sha256"] == source_sha256 and data["export_version"] == export_version

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST_NAME).read_text())

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def revision(self) -> str:
        """The sha256 of the GGUF the directory was prepared from."""
        return self.manifest["source"]["sha256"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def config(self) -> LlamaConfig:
        return LlamaConfig(**self.manifest["config"])

    @property
    def decoder_path(self) -> Path:
        return self.path / self.manifest["files"]["decoder"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["files"]["tokenizer"]

    @property
    def chat_template(self) -> str:
        return (self.path / self.manifest["files"]["chat_template"]).read_text()

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.manifest["eos_token_ids"])

    @property
    def bos_token_id(self) -> int:
        return int(self.manifest["bos_token_id"])


def add_models_root_arg(parser) -> None:
    import os

    parser.add_argument(
        "--models-root",
        type=Path,
        default=Path(os.environ.get("MESHSERVE_MODELS_ROOT", "models")),
        help="where `meshserve prepare-model` puts prepared models (env MESHSERVE_MODELS_ROOT)",
    )


EXPORT_VERSION = 7
"""The layout of the prepared directory this code reads and writes. Bump when the exported graph or files
change, so old directories are rebuilt (6: packed steps over PackedAttention, keys in blocks of 16)."""


def find_model(models_root: Path, precision: str | None = None) -> ModelDirectory:
    """The most recently prepared model directory under `models_root` of this code's export version."""
    manifests = {p.parent: json.loads(p.read_text()) for p in Path(models_root).glob(f"*/*/{MANIFEST_NAME}")}
    matching = {p: m for p, m in manifests.items() if precision is None or m.get("precision") == precision}
    candidates = [p for p, m in matching.items() if m.get("export_version") == EXPORT_VERSION]
    if not candidates:
        older = sorted({str(m.get("export_version")) for m in matching.values()})
        found = f" (only directories of export version {', '.join(older)}; this meshserve reads {EXPORT_VERSION})"
        command = f"meshserve prepare-model --models-root {models_root}" + (
            f" --precision {precision}" if precision else ""
        )
        raise SystemExit(f"no prepared model under {models_root}{found if older else ''}: run `{command}`")
    return ModelDirectory(max(candidates, key=lambda p: (p / MANIFEST_NAME).stat().st_mtime))
