# Targets match the README. Builds use two jobs: the reference machine has two cores.
CARGO ?= cargo
JOBS ?= 2

.PHONY: run test server-bin test-rust test-sim-replay test-python test-python-client test-helm test-monitoring e2e nemesis image bench lint fmt

run:
	$(CARGO) run -j$(JOBS) --release -- serve

# One compile: the Python suites run the server binary that `cargo test`
# built (`cargo build` would compile tokio and everything above it again,
# without the dev-dependency feature `test-util`). More seeds of the
# simulated cluster run by hand (`make test-sim-replay`, recorded in
# docs/RELIABILITY.md).
test: test-rust test-python test-python-client test-helm test-monitoring

test-rust:
	$(CARGO) test -j$(JOBS) --workspace

# The simulated cluster's seeds 1001-1200, in the build `make test` made
# (.cargo/config.toml adds --cfg tokio_unstable, so a seed replays exactly).
# One that fails replays with SIM_SEED=S cargo test --workspace --test sim
test-sim-replay:
	SIM_FIRST_SEED=1001 SIM_SEEDS=200 $(CARGO) test -j$(JOBS) --workspace --test sim

# The server binary as `cargo test` builds it, for the Python suites run
# alone. The same targets as test-rust: selecting only `--test integration`
# leaves the other crates' dev-dependencies out of feature unification,
# which rebuilt tonic, prost and the server (about 5 minutes) after a full
# test-rust; this way it is a no-op after it.
server-bin:
	$(CARGO) test -j$(JOBS) --no-run --workspace

test-python: server-bin
	python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
	python3 -m pytest -q tests/python

# The Python client package (clients/python): installed with pip, then tested
# against real servers (single node, TLS + auth, a 3-node cluster).
test-python-client: server-bin
	python3 -m pip install --quiet --disable-pip-version-check -r clients/python/tests/requirements.txt ./clients/python
	python3 -m pytest -q clients/python/tests

# The helm chart: rendered by real Helm, manifests validated strictly.
test-helm:
	python3 -m pip install --quiet --disable-pip-version-check -r helm/tests/requirements.txt
	python3 -m pytest -q helm/tests

# The Grafana dashboard's queries through a real Prometheus scraping a
# 3-node cluster under load (the alerts' promtool tests are in test-helm),
# and `arbiter top` under tmux. They need Debian's `prometheus` package
# (promtool with it) and tmux; without them they skip, except under CI.
test-monitoring: server-bin
	python3 -m pip install --quiet --disable-pip-version-check -r clients/python/tests/requirements.txt ./clients/python
	python3 -m pytest -q tests/monitoring

# Fault tests on a 3-container cluster (needs a Docker engine).
e2e:
	cluster/e2e.sh

# Randomised fault runs with checked histories (cluster/nemesis.sh; needs
# Docker and root). RUNS=100 for the long mode recorded in docs/RELIABILITY.md.
nemesis:
	cluster/nemesis.sh

# The container image arbiter:local, without an image registry.
image:
	docker/build-local.sh

bench:
	$(CARGO) bench -j$(JOBS) -p arbiter-engine --bench engine
	$(CARGO) bench -j$(JOBS) -p arbiter-engine --bench memory

lint:
	$(CARGO) fmt --all -- --check
	scripts/check-file-size.sh
	scripts/module-layers.sh
	$(CARGO) clippy -j$(JOBS) --workspace --all-targets -- -D warnings
	# Licenses, banned crates and sources (deny.toml); advisories need the
	# RustSec database from GitHub: `cargo deny check advisories` where reachable.
	$(CARGO) deny check licenses bans sources

fmt:
	$(CARGO) fmt --all
