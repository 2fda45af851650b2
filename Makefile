# Phantom: `make up` starts a local cluster, `make test` runs the suite.
# Every target bootstraps .venv on a fresh machine (python3 -m venv + pip install -e '.[dev]').

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SUPERVISORCTL := $(VENV)/bin/supervisorctl -c supervisor.conf
# `make up-ha`: three control-plane "hosts" and a three-member etcd on this machine.
HA_CONF := supervisor-ha.conf
SUPERVISORCTL_HA := $(VENV)/bin/supervisorctl -c $(HA_CONF)

# The cluster's CURVE keys, made on the first `make up` (security is on by default;
# PHANTOM_SECURITY=off turns it off). Every process and tool of this checkout finds them.
KEYS := $${PHANTOM_DATA:-var}/keys
DEMO_AGENTS := node-1,node-2,node-3

.PHONY: up up-ha down test top bench venv status lint keys sim

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

keys:
	@if [ ! -f $(KEYS)/authorized/broker/broker.pub ]; then \
		$(VENV)/bin/phantom keygen $(KEYS) --agents $(DEMO_AGENTS) --json >/dev/null || exit 1; \
		echo "made CURVE keys in $(KEYS): the bus is authenticated and encrypted (PHANTOM_SECURITY=off turns it off)"; \
	fi

up: $(STAMP) keys
	@mkdir -p var/log
	@if $(SUPERVISORCTL) pid >/dev/null 2>&1; then \
		echo "supervisord already running; starting any stopped programs"; \
		$(SUPERVISORCTL) start 'phantom:*' >/dev/null; \
	else \
		$(VENV)/bin/supervisord -c supervisor.conf; \
	fi
	@$(PY) bin/phantom-wait

# The HA set starts only when no single-host set runs (both use node-1..3); etcd first, then the
# hosts and agents (supervisord's priorities), and every service must register three times over.
up-ha: $(STAMP) keys
	@$(PY) deploy/etcd-member --find >/dev/null || { echo "make up-ha needs an etcd binary (see above)"; exit 1; }
	@if $(SUPERVISORCTL) pid >/dev/null 2>&1; then \
		echo "the single-host set (make up) is running: make down first"; exit 1; \
	fi
	@mkdir -p var/ha/log
	@if $(SUPERVISORCTL_HA) pid >/dev/null 2>&1; then \
		echo "supervisord (HA) already running; starting any stopped programs"; \
		$(SUPERVISORCTL_HA) start all >/dev/null; \
	else \
		$(VENV)/bin/supervisord -c $(HA_CONF); \
	fi
	@. deploy/ha.env && $(PY) bin/phantom-wait --conf $(HA_CONF) --timeout 180

# Stops whichever of the two sets runs (supervisord takes its programs down with it).
down:
	@stopped=""; \
	for conf in supervisor.conf $(HA_CONF); do \
		ctl="$(VENV)/bin/supervisorctl -c $$conf"; \
		if [ -x $(VENV)/bin/supervisorctl ] && $$ctl pid >/dev/null 2>&1; then \
			pid=$$($$ctl pid); \
			$$ctl shutdown >/dev/null; \
			for i in $$(seq 1 150); do kill -0 $$pid 2>/dev/null || break; sleep 0.1; done; \
			if [ $$conf = supervisor.conf ]; then echo "phantom stopped"; else echo "phantom (HA, $$conf) stopped"; fi; \
			stopped=yes; \
		fi; \
	done; \
	[ -n "$$stopped" ] || echo "phantom is not running"

status: $(STAMP)
	@$(VENV)/bin/phantom status

# Two workers, a test file each at a time (xdist --dist loadfile): most real-process tests
# wait on timers, so two files in parallel halve the wall time on two cores. Every test
# file stands alone (free ports, its own directories). PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

top: $(STAMP)
	@$(PY) bin/phantom-top

# Deterministic simulation: 10,000 seeded fault histories of the whole control plane.
SIM_SEEDS ?= 10000
SIM_STEPS ?= 5
sim: $(STAMP)
	$(PY) -m phantom_sim --seeds $(SIM_SEEDS) --steps $(SIM_STEPS)

bench: $(STAMP)
	@for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; echo; done

lint: $(STAMP)
	$(VENV)/bin/ruff check phantom_bus services tests bench phantom_sim
	$(VENV)/bin/mypy phantom_bus services phantom_sim
