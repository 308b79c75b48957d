# Two commands matter: `make up` serves the mesh, `make test` runs every test.
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')
PORT ?= 8080

.DEFAULT_GOAL := up

# `make lint`: lint and import order (ruff), format (ruff format), layer contracts (import-linter) and types
# (mypy), configured in pyproject.toml; `make test` runs it first. `make format` rewrites what ruff can fix.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

.PHONY: lint format up test test-fast install protos prepare-model bench clean envoy-configs

up: install
	$(VENV)/bin/meshserve up --port $(PORT)

# The container test (tests/deploy/test_containers.py) gets its Docker engine and base image itself
# (deploy/tools/docker.sh: Debian's docker.io, dockerd started when none runs, the base built once per machine);
# MESHSERVE_SKIP_CONTAINERS=1 skips it for quick local runs (not under CI=true).
test: lint
	bash deploy/tools/install.sh $(VENV)
	bash deploy/tools/install-redis.sh
	bash clients/cpp/install.sh
	$(VENV)/bin/pytest -q -rs

# The hermetic tier alone (tests/unit: no network, no prepared model, no external binary), in seconds;
# run without a network (a network namespace of its own) where the machine allows unprivileged ones.
NO_NETWORK := $(shell unshare -rn true 2>/dev/null && echo unshare -rn)
test-fast: install
	$(NO_NETWORK) $(VENV)/bin/pytest -q -p no:cacheprovider tests/unit

ORT_OPS := services/inference/backends/ort_ops
install: $(VENV)/.installed gen/python/.stamp clients/node/node_modules/.stamp $(ORT_OPS)/libmeshserve_ort_ops.so

# meshserve's own ONNX Runtime operators (the w8a8 precision's); build.sh fetches ONNX Runtime's headers
# from Debian's libonnxruntime-dev once, into ~/.cache/meshserve.
$(ORT_OPS)/libmeshserve_ort_ops.so: $(ORT_OPS)/meshserve_ops.cc $(ORT_OPS)/build.sh
	bash $(ORT_OPS)/build.sh

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# Python stubs (+ .pyi) go to gen/python, an import root added to the venv with a .pth file.
gen/python/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf gen/python && mkdir -p gen/python
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen/python --pyi_out=gen/python --grpc_python_out=gen/python $(PROTOS)
	$(PY) -c "import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()['purelib'], 'meshserve_protos.pth').write_text('$(CURDIR)/gen/python\n')"
	touch $@

# the Node.js client (tests/e2e/test_node_client.py) and buf (proto lint and breaking checks).
# `npm install`, not `npm ci`: the registry here lacks buf's macOS/Windows binaries, so the lockfile cannot pin them.
clients/node/node_modules/.stamp: clients/node/package-lock.json
	npm install --prefix clients/node --no-audit --no-fund --loglevel=error
	touch $@

protos: gen/python/.stamp

prepare-model: install
	$(VENV)/bin/meshserve prepare-model

# The Envoy configs under deploy/ (compose, Kubernetes), rendered from services/gateway/envoy.yaml.j2 like `meshserve up`'s;
# tests/deploy/test_envoy_configs.py fails until this is run after a template change.
envoy-configs: install
	$(VENV)/bin/meshserve render-envoy --deploy

bench: install
	$(VENV)/bin/meshserve bench --target localhost:$(PORT)

clean:
	rm -rf gen .run clients/cpp/build $(ORT_OPS)/libmeshserve_ort_ops.so
