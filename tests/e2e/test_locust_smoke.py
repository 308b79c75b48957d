"""bench/locustfile.py runs headless for a few seconds against the mesh's OpenAI endpoint, through Envoy,
and every request it sends succeeds."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_locust_user_runs_headless_without_failures(mesh, tmp_path):
    locust = Path(sys.executable).with_name("locust")
    prefix = tmp_path / "locust"
    result = subprocess.run(
        [
            str(locust),
            "-f",
            str(REPO / "bench" / "locustfile.py"),
            "--host",
            f"http://{mesh.target}",
            "--headless",
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--run-time",
            "10s",
            "--stop-timeout",
            "120",
            "--only-summary",
            "--csv",
            str(prefix),
            "--exit-code-on-error",
            "1",
        ],
        env=dict(os.environ, MESHSERVE_MAX_TOKENS="8"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(open(f"{prefix}_stats.csv"))}
    stream = rows[("POST", "/v1/chat/completions (stream)")]
    completions = rows[("POST", "/v1/completions")]
    ttft = rows[("TTFT", "/v1/chat/completions (stream)")]
    total = rows[("", "Aggregated")]
    # each user's requests cycle through a completion and three streamed chats, and finish after the run time
    assert int(completions["Request Count"]) >= 2 and int(stream["Request Count"]) >= 2, result.stderr[-3000:]
    assert int(total["Failure Count"]) == 0, open(f"{prefix}_failures.csv").read()
    assert int(ttft["Request Count"]) == int(stream["Request Count"]) and float(ttft["Median Response Time"]) > 0
