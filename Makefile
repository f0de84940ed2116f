# make demo: train on the embedded digits data with a local broker, coordinator and 4 agents.
# make test: the whole test suite (unit + integration against a real Mosquitto, in a container
# when Docker can run one).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean fleet-check fleet-units broker-image

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build (an unpinned torch pulls a multi-GB CUDA build);
	# pyproject.toml only bounds it. The base install is an agent's; here the coordinator too.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[coordinator,test]'
	touch $(STAMP)

demo: install
	$(BIN)/fl-demo

# Integration tests use Mosquitto in a container when Docker can run it (the script starts
# dockerd and builds the image when it can, else says why); the mosquitto binary otherwise.
test: install
	-bash scripts/broker-image.sh --if-possible
	$(BIN)/pytest -q -rs --durations=10

# The integration tests' broker image (issue 19): no registry, needs root to build.
broker-image:
	bash scripts/broker-image.sh

lint: install
	$(BIN)/ruff check .

# The fleet playbook (issue 6): lint, syntax, supervisor and unit checks (no 16-agent proof).
fleet-check: install
	cd ansible && $(abspath $(BIN))/ansible-lint --offline
	$(BIN)/pytest -q -rs tests/test_fleet.py -m 'not slow'

# Re-render systemd/ from the role templates (tests/test_fleet.py checks they match).
fleet-units: install
	cd ansible && ANSIBLE_CONFIG=ansible.cfg $(abspath $(BIN))/ansible-playbook render-units.yml

bench: install
	$(BIN)/python bench/codec_throughput.py
	$(BIN)/python bench/aggregation.py
	$(BIN)/python bench/dga_vs_fedavg.py

clean:
	rm -rf $(VENV) runs .pytest_cache
