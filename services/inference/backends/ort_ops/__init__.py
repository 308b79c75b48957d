"""meshserve's own ONNX Runtime operators (domain `meshserve.ops`, meshserve_ops.cc), for the CPU decoder
graphs that use them (the w8a8 precision's RowQuantize). build.sh compiles the library beside this file
(`make install` and the CPU image run it); a session registers it with `register_custom_ops_library`."""

from __future__ import annotations

from pathlib import Path

from services.inference.backends.probes import BackendUnavailableError

DOMAIN = "meshserve.ops"
LIBRARY = Path(__file__).with_name("libmeshserve_ort_ops.so")
BUILD_COMMAND = "bash services/inference/backends/ort_ops/build.sh"


class OpsLibraryMissing(BackendUnavailableError):
    """The model needs meshserve's operators and their library was not built."""


def library_path() -> Path:
    """The built library, or OpsLibraryMissing naming the command that builds it."""
    if not LIBRARY.is_file():
        raise OpsLibraryMissing(
            f"this model's decoder uses meshserve's ONNX Runtime operators ({DOMAIN}), and {LIBRARY} "
            f"is not built: run `make install` (or `{BUILD_COMMAND}`)"
        )
    return LIBRARY


def library_for(manifest: dict) -> Path | None:
    """The library a model directory's CPU decoder needs (its manifest's `custom_ops`), None when it needs
    none; OpsLibraryMissing when it needs it and it is not built."""
    return library_path() if DOMAIN in manifest.get("custom_ops", []) else None
