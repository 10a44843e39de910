# Synchro: the two commands a user needs are `sudo make demo` and `make test`.
PYTHON ?= python3
IMAGE ?= synchro:dev
KIND_CLUSTER ?= synchro

.PHONY: install test test-unit test-netns check lint demo image kind-up kind-demo kind-test kind-down bench clean

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

# Gateway API CRDs (HTTPRoute, GRPCRoute): kind has none, and the shop's canary is an HTTPRoute.
GATEWAY_API_VERSION ?= v1.2.1
GATEWAY_API_CRDS ?= https://github.com/kubernetes-sigs/gateway-api/releases/download/$(GATEWAY_API_VERSION)/standard-install.yaml
EXAMPLES_IMAGE ?= synchro-examples:dev
KIND_CONTEXT = kind-$(KIND_CLUSTER)

kind-up:
	kind create cluster --name $(KIND_CLUSTER) --config kind-config.yaml
	kubectl --context $(KIND_CONTEXT) apply -f $(GATEWAY_API_CRDS)
	docker build -f deploy/Dockerfile -t $(IMAGE) .
	docker build -f examples/Dockerfile --build-arg BASE=$(IMAGE) -t $(EXAMPLES_IMAGE) examples
	kind load docker-image $(IMAGE) $(EXAMPLES_IMAGE) --name $(KIND_CLUSTER)
	kubectl --context $(KIND_CONTEXT) apply -k deploy/
	kubectl --context $(KIND_CONTEXT) -n synchro-system rollout status deployment/synchro-controller --timeout=180s

# The shop of `make demo`, on the kind cluster (namespace shop, labelled for injection).
kind-demo:
	kubectl --context $(KIND_CONTEXT) apply -f examples/shop/
	for d in frontend catalog-v1 catalog-v2 ratings ratings-flaky ratings-slow payments; do \
		kubectl --context $(KIND_CONTEXT) -n shop rollout status deployment/$$d --timeout=240s || exit 1; \
	done

kind-test:
	SYNCHRO_KIND=1 SYNCHRO_KIND_CONTEXT=$(KIND_CONTEXT) $(PYTHON) -m pytest -q tests/kind

kind-down:
	kind delete cluster --name $(KIND_CLUSTER)

bench:
	$(PYTHON) bench/webhook.py
	$(PYTHON) bench/proxy.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
