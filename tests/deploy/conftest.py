"""Shared helpers for the deployment checks: where the external tools are, what docs/conventions.md
promises (ports, metric names), and a small PromQL metric-name extractor.

The tools (kubectl, promtool, hadolint; envoy comes with meshserve) are installed by
`bash deploy/tools/install.sh`; a missing one fails the test that needs it, it is never skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONVENTIONS = REPO / "docs" / "conventions.md"


def tool(name: str) -> str:
    """The path of an external tool: the venv's bin first (where install.sh puts them), then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `bash deploy/tools/install.sh` (tests/deploy needs it)")
    return found


def run(args: list[str], cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class Process:
    """One row of the conventions' process table."""

    name: str
    grpc_port: int
    metrics_port: int
    command: str


@cache
def conventions_processes() -> dict[str, Process]:
    """{"envoy": ..., "router": ..., "tokenizer": ..., "inference": ...} from the table in conventions.md."""
    processes = {}
    for line in CONVENTIONS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[2].isdigit():
            continue
        name = cells[0].split()[0].lower()
        metrics = int(re.search(r"\d+", cells[3]).group(0))  # "9101" or "admin 9901"
        processes[name] = Process(name, int(cells[2]), metrics, cells[1].strip("`"))
    assert set(processes) == {"envoy", "router", "tokenizer", "inference"}, processes
    return processes


@cache
def conventions_metrics() -> tuple[frozenset[str], frozenset[str]]:
    """(every metric name, the histograms among them) from the Metrics bullet of conventions.md."""
    text = CONVENTIONS.read_text()
    section = text[text.index("Metrics (Prometheus") :]
    section = section[: section.index("(gauges)")]
    histograms_part = section[: section.index("(histograms)")]
    names = frozenset(re.findall(r"`(meshserve_[a-z0-9_]+)", section))
    histograms = frozenset(re.findall(r"`(meshserve_[a-z0-9_]+)", histograms_part))
    assert len(names) >= 10 and len(histograms) == 4, (names, histograms)
    return names, histograms


def allowed_series_names() -> frozenset[str]:
    """Names a query may use: each conventions metric, plus _bucket/_sum/_count of the histograms."""
    names, histograms = conventions_metrics()
    return names | {h + suffix for h in histograms for suffix in ("_bucket", "_sum", "_count")}


_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords, label names
    (inside {...}, by (...), ...), durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group(0)
        if expr[match.end() :].lstrip().startswith("(") or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def model_precision(dockerfile: Path) -> str:
    """The precision a Dockerfile prepares its model in: the default of its one MODEL_PRECISION build arg."""
    [precision] = re.findall(r"^ARG MODEL_PRECISION=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    return precision


def load_yaml_documents(text: str) -> list[dict]:
    """The mappings of a (multi-document) YAML text."""
    import yaml

    return [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]
