"""find_model (services/modelstore/layout.py): the newest directory of this code's export version, never one
an older meshserve prepared (its graph would not load), and an error that says which command to run."""

from __future__ import annotations

import json
import os

import pytest

from services.modelstore.layout import EXPORT_VERSION, MANIFEST_NAME, find_model


def _prepared(root, name: str, precision: str, version: int, mtime: float):
    directory = root / "smollm2-135m-instruct" / name
    directory.mkdir(parents=True)
    manifest = directory / MANIFEST_NAME
    manifest.write_text(json.dumps({"precision": precision, "export_version": version}))
    os.utime(manifest, (mtime, mtime))
    return directory


def test_the_newest_directory_of_this_export_version_wins(tmp_path):
    current = _prepared(tmp_path, "a-int8-now", "int8", EXPORT_VERSION, 1_000)
    _prepared(tmp_path, "a-int8-old", "int8", EXPORT_VERSION - 1, 2_000)  # newer, but of an older layout
    newer_w8a8 = _prepared(tmp_path, "a-w8a8-now", "w8a8", EXPORT_VERSION, 1_500)
    assert find_model(tmp_path, "int8").path == current
    assert find_model(tmp_path).path == newer_w8a8


def test_only_older_directories_name_the_versions_and_the_command(tmp_path):
    _prepared(tmp_path, "a-int8-old", "int8", EXPORT_VERSION - 1, 1_000)
    with pytest.raises(
        SystemExit, match=rf"export version {EXPORT_VERSION - 1}; this meshserve reads {EXPORT_VERSION}"
    ):
        find_model(tmp_path, "int8")
    with pytest.raises(SystemExit, match=r"run `meshserve prepare-model --models-root .* --precision w8a8`"):
        find_model(tmp_path, "w8a8")
