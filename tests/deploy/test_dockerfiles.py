"""The container images, as far as they can be checked without a Docker engine: hadolint, the stage
structure (every stage from a FROM, COPY --from an earlier stage, a non-root final user), the steps the
images must contain, and the build context that .dockerignore leaves, built into a wheel with the
Dockerfile's own protoc command run on it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, REPO, run, tool

DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile*"))
# the images that run meshserve (Dockerfile.alertmanager, .prometheus and .redis are compose's and Swarm's
# Alertmanager, Prometheus and Redis)
MESHSERVE_DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.gpu"]
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile: continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "a continued instruction runs off the end"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, arguments = line.strip().partition(" ")
        instruction, arguments = instruction.upper(), arguments.strip()
        if instruction == "FROM":
            words = [w for w in arguments.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), line
            stages.append(Stage(words[0], name))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            key, _, default = arguments.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((instruction, arguments))
    return global_args, stages


def effective_user(stages: list[Stage], index: int) -> str:
    """The USER in force at the end of stage `index`, following FROM <earlier stage>."""
    stage = stages[index]
    users = [args for instruction, args in stage.instructions if instruction == "USER"]
    if users:
        return users[-1]
    earlier = {s.name: i for i, s in enumerate(stages[:index]) if s.name}
    return effective_user(stages, earlier[stage.base]) if stage.base in earlier else "root"


def runs(stages: list[Stage]) -> str:
    return "\n".join(args for stage in stages for instruction, args in stage.instructions if instruction == "RUN")


def test_the_five_images_are_there():
    assert [p.name for p in DOCKERFILES] == [
        "Dockerfile",
        "Dockerfile.alertmanager",
        "Dockerfile.gpu",
        "Dockerfile.prometheus",
        "Dockerfile.redis",
    ]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path):
    result = run([tool("hadolint"), "--no-color", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install .\n")
    assert run([tool("hadolint"), "--no-color", str(bad)]).returncode != 0


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_stages(path: Path):
    global_args, stages = parse(path)
    if path in MESHSERVE_DOCKERFILES:
        assert len(stages) >= 3, "multi-stage: build, model, runtime"
    names = [s.name for s in stages]
    assert len(set(names)) == len(names)
    for i, stage in enumerate(stages):
        base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), stage.base)
        assert "$" not in base, f"{stage.base} uses an ARG with no default"
        assert ":" in base or base in names[:i], f"{base}: pin a tag"
        assert base not in names[i:], "FROM a later stage"
        for instruction, args in stage.instructions:
            source = re.search(r"--from=(\S+)", args) if instruction == "COPY" else None
            if source:
                assert source.group(1) in names[:i], f"COPY --from={source.group(1)} is not an earlier stage"
    final_user = effective_user(stages, len(stages) - 1)
    assert final_user.split(":")[0] not in {"root", "0"}, f"final stage runs as {final_user}"
    assert any(instruction == "USER" for instruction, _ in stages[-1].instructions), "state USER in the final stage"


def test_a_root_final_stage_is_caught(tmp_path: Path):
    path = tmp_path / "Dockerfile"
    path.write_text("FROM python:3.12-slim AS a\nUSER 10001\nFROM a AS b\nUSER root\n")
    _, stages = parse(path)
    assert effective_user(stages, 1) == "root"
    path.write_text("FROM python:3.12-slim AS a\nUSER 10001\nFROM a AS b\nRUN true\n")
    _, stages = parse(path)
    assert effective_user(stages, 1) == "10001"


@pytest.mark.parametrize("path", MESHSERVE_DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_repo_generate_stubs_and_prepare_the_model(path: Path):
    _, stages = parse(path)
    commands = runs(stages)
    assert re.search(r"pip install( --[\w-]+( /\S+)?)* \.( |$)", commands, re.M), (
        "installs the repo with `pip install .`"
    )
    protoc = next(line for line in commands.splitlines() if "grpc_tools.protoc" in line)
    for option in ("-Iprotos", "--python_out=", "--pyi_out=", "--grpc_python_out="):
        assert option in protoc
    assert ".pth" in commands, "puts the stubs on sys.path with a .pth file"
    assert re.search(r"meshserve prepare-model --models-root /models", commands)
    copied_models = [args for s in stages[-1:] for i, args in s.instructions if i == "COPY" and "/models" in args]
    assert copied_models, "the final stage carries the prepared model"
    assert parse(path)[1][-1].instructions[-1][0] == "CMD"


def test_cpu_runtime_stages_install_nothing_and_copy_only_the_venv_and_the_model():
    """No compiler, pip cache, test extra or torch in the image that runs: the runtime stages start from the
    bare base and only COPY what the build and model stages made (the container test also tries importing
    torch and pytest in the built image)."""
    _, stages = parse(DEPLOY / "docker" / "Dockerfile")
    by_name = {s.name: s for s in stages}
    assert by_name["slim"].base == "${PYTHON_IMAGE}" and by_name["runtime"].base == "slim"
    for stage in (by_name["slim"], by_name["runtime"]):
        for instruction, args in stage.instructions:
            if instruction == "RUN":
                assert not re.search(r"pip install|apt-get install", args), args
    deps = runs([by_name["deps"]])
    assert "['project']['dependencies']" in deps and "optional-dependencies" not in deps, "no test extras"


def test_gpu_image_is_on_tensorrt_with_a_recent_enough_python():
    global_args, stages = parse(DEPLOY / "docker" / "Dockerfile.gpu")
    image = global_args["TENSORRT_IMAGE"]
    match = re.fullmatch(r"nvcr\.io/nvidia/tensorrt:(\d\d)\.(\d\d)-py3", image)
    assert match, image
    # 24.12 and later are Ubuntu 24.04 with Python 3.12; meshserve needs Python >= 3.11
    assert (int(match.group(1)), int(match.group(2))) >= (24, 12)
    assert stages[-1].base == "${TENSORRT_IMAGE}"
    assert "import tensorrt" in runs(stages)


# -- the build context --------------------------------------------------------------------------


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str], str]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((negate, re.compile(regex), pattern))
    return rules


def _ignored(relative: str, rules) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parent folders, decides."""
    parts = relative.split("/")
    ignored = False
    for negate, regex, _ in rules:
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def build_context() -> list[str]:
    """Files (relative paths) that `docker build .` would send, per .dockerignore."""
    rules = _dockerignore_rules()
    negated = [pattern for negate, _, pattern in rules if negate]
    files = []
    for folder, subfolders, names in os.walk(REPO):
        relative_folder = Path(folder).relative_to(REPO).as_posix()
        prefix = "" if relative_folder == "." else relative_folder + "/"
        subfolders[:] = [
            d
            for d in subfolders
            if not _ignored(prefix + d, rules) or any(p.startswith(prefix + d + "/") for p in negated)
        ]
        files += [prefix + n for n in names if not _ignored(prefix + n, rules)]
    return sorted(files)


def test_dockerignore_matcher():
    rules = _dockerignore_rules()
    assert _ignored(".venv/bin/python", rules)
    assert _ignored("models/x/decoder.onnx", rules)
    assert not _ignored("services/cli/main.py", rules)
    assert _ignored("services/cli/__pycache__/main.cpython-311.pyc", rules)


def test_context_holds_what_the_dockerfiles_copy_and_nothing_heavy():
    context = build_context()
    assert "pyproject.toml" in context
    for path in DOCKERFILES:
        for stage in parse(path)[1]:
            for instruction, args in stage.instructions:
                if instruction not in {"COPY", "ADD"} or "--from=" in args:
                    continue
                sources = [w for w in args.split() if not w.startswith("--")][:-1]
                for source in sources:
                    source = source.rstrip("/")
                    assert any(f == source or f.startswith(source + "/") for f in context), f"{path.name}: {source}"
    for heavy in (".git/", ".venv/", "models/", "gen/", ".run/", "node_modules/"):
        assert not any(f.startswith(heavy) or f"/{heavy}" in f for f in context), heavy
    assert not any("__pycache__" in f for f in context)


def test_context_builds_the_package_and_the_dockerfile_generates_importable_stubs(tmp_path: Path):
    """`pip install .` on exactly the files Docker would see, then the Dockerfile's own mkdir + protoc
    commands (paths moved under tmp_path), then an import of the generated stubs."""
    context = tmp_path / "context"
    for relative in build_context():
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, context / relative)
    result = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--disable-pip-version-check",
            "-w",
            str(tmp_path / "wheel"),
            str(context),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = (tmp_path / "wheel").glob("meshserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "services/cli/main.py" in names and "services/inference/main.py" in names
    assert "meshserve = services.cli.main:main" in entry_points

    _, stages = parse(DEPLOY / "docker" / "Dockerfile")
    [stub_step] = [line for line in runs(stages).splitlines() if "grpc_tools.protoc" in line]
    out = tmp_path / "opt"
    steps = [s.strip() for s in stub_step.split("&&") if s.strip().startswith(("mkdir", "find"))]
    assert len(steps) == 2, steps
    script = " && ".join(steps).replace("/opt/meshserve", str(out)).replace("python -m", f"{sys.executable} -m")
    result = subprocess.run(["bash", "-c", script], cwd=context, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    check = (
        "import meshserve.v1.generation_service_pb2_grpc as m, meshserve.inference.v1.inference_service_pb2_grpc;"
        " print(m.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(out / "gen" / "python")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(out)), result.stdout
