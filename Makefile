# Synchro: the two commands a user needs are `sudo make demo` and `make test`.
PYTHON ?= python3
IMAGE ?= synchro:dev
KIND_CLUSTER ?= synchro

.PHONY: install test test-unit test-netns check lint demo image kind-up kind-down bench clean

install:
	$(PYTHON) -m pip install -q -e '.[dev]'

test:
	$(PYTHON) -m pytest -q tests

test-unit:
	$(PYTHON) -m pytest -q tests/unit tests/integration

test-netns:
	$(PYTHON) -m pytest -q tests/netns

check:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	lint-imports

demo:
	bash examples/demo.sh

image:
	docker build -f deploy/Dockerfile -t $(IMAGE) .

kind-up:
	kind create cluster --name $(KIND_CLUSTER) --config kind-config.yaml
	docker build -f deploy/Dockerfile -t $(IMAGE) .
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)
	kubectl apply -k deploy/
	kubectl -n synchro-system rollout status deployment/synchro-controller --timeout=180s

kind-down:
	kind delete cluster --name $(KIND_CLUSTER)

bench:
	$(PYTHON) bench/webhook.py
	$(PYTHON) bench/proxy.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
