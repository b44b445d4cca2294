# The README's two commands: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-install

# The local Ray cluster's environment (see the file); the environment's own values win.
RAY_ENV := $(shell sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' configs/ray.env)
$(foreach v,$(RAY_ENV),$(eval $(v) ?= $(shell sed -n 's/^$(v)=//p' configs/ray.env)))
export $(RAY_ENV)

.PHONY: install run run-tiny test test-unit lint load bench bench-quick bench-stream bench-overload \
        bench-cache eval-ppl clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the CPU build; a looser pin pulls CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,postgres]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/serve run serve_config.yaml

run-tiny: install
	$(BIN)/serve run configs/tiny.yaml

test: install
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest tests/unit

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Against a running app: make load HOST=http://127.0.0.1:8000 USERS=16 TIME=60s
HOST  ?= http://127.0.0.1:8000
USERS ?= 16
TIME  ?= 60s
load: install
	$(BIN)/locust -f loadtests/locustfile.py --headless -u $(USERS) -r $(USERS) -t $(TIME) --host $(HOST)

# Batching benchmark: raw generate() vs the service, batching on/off, dtypes, mixed lengths;
# gpt2-int8 against CTranslate2 int8, int8 accuracy and memory (see docs/benchmarks.md).
bench: install
	$(BIN)/python loadtests/bench_batching.py

bench-quick: install
	$(BIN)/python loadtests/bench_batching.py --quick

# Perplexity of MODEL (hub id, local save_pretrained dir, or standin:gpt2) on TEXT, in float32
# and int8: what int8 costs on your weights. make eval-ppl MODEL=/models/gpt2 TEXT=corpus.txt
MODEL ?= standin:gpt2
TEXT  ?= loadtests/texts/accuracy.txt
eval-ppl: install
	$(BIN)/python loadtests/eval_ppl.py --model $(MODEL) --text $(TEXT)

# Streaming: TTFT and inter-token latency at 1 and 32 streams, against raw prefill + one step
# and against the unstreamed route, in one run. Writes bench-results/stream.json.
bench-stream: install
	$(BIN)/python loadtests/bench_stream.py

# Admission control: 32 users against 320 (10x) on configs/bench.yaml, in alternating windows.
# Prints the table with the CPU flags, writes bench-results/overload.json.
# Behind the default front, Ray's HAProxy; PROXY=serve measures it behind Serve's Python proxy.
PROXY ?= haproxy
bench-overload: install
	$(BIN)/python loadtests/bench_overload.py --proxy $(PROXY)

# Starts configs/tiny.yaml itself, or measures a running app: make bench-cache URL=http://...
# Prints a table, writes bench-results/cache.json, exits non-zero when a target is missed.
URL ?=
bench-cache: install
	$(BIN)/python loadtests/bench_cache.py $(if $(URL),--url $(URL))

# The system of record: migrate ahead of a deploy, apply retention, measure (see docs/persistence.md).
# CONFIG is the Serve config whose database_url (or env DATABASE_URL) is meant.
CONFIG ?= serve_config.yaml
.PHONY: db-upgrade db-purge bench-persistence
db-upgrade: install
	$(BIN)/python -m serve_app.storage --config $(CONFIG) upgrade

db-purge: install
	$(BIN)/python -m serve_app.storage --config $(CONFIG) purge $(if $(DAYS),--older-than-days $(DAYS))

bench-persistence: install
	$(BIN)/python loadtests/bench_persistence.py

# Local Prometheus scraping the running cluster's metrics (Debian's package, installed when
# missing). The Ray dashboard's Metrics view reads it when Ray starts with
# RAY_PROMETHEUS_HOST=http://127.0.0.1:$(PROM_PORT) (see the README's "Operating it").
PROM_PORT ?= 9090
PROM_DIR  := data/prometheus
.PHONY: observe observe-stop
observe:
	@command -v prometheus >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus)
	mkdir -p $(PROM_DIR)
	@if [ -f $(PROM_DIR)/pid ] && kill -0 $$(cat $(PROM_DIR)/pid) 2>/dev/null; then \
		echo "already running"; else \
		nohup prometheus --config.file=configs/prometheus.yml --storage.tsdb.path=$(PROM_DIR) \
			--web.listen-address=127.0.0.1:$(PROM_PORT) > $(PROM_DIR)/prometheus.log 2>&1 & \
		echo $$! > $(PROM_DIR)/pid; fi
	@echo "Prometheus: http://127.0.0.1:$(PROM_PORT)  (Grafana dashboard: deploy/grafana/serve-gpt2.json; stop: make observe-stop)"

observe-stop:
	@if [ -f $(PROM_DIR)/pid ]; then kill $$(cat $(PROM_DIR)/pid) 2>/dev/null; rm -f $(PROM_DIR)/pid; fi

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache *.egg-info

# A two-node Ray cluster on this machine (two raylets; deploy/local_cluster.py), for trying
# configs/cluster.yaml and for the autoscaling demo. Every node shares the Redis and the
# PostgreSQL named by REDIS_URL and DATABASE_URL, which must be set. Replicas import this
# checkout (PYTHONPATH). Stop it with make cluster-down (it stops only its own processes).
CLUSTER_CONFIG ?= configs/cluster.yaml
.PHONY: cluster-env cluster-up cluster-deploy cluster-status cluster-down demo-autoscale
cluster-env:
	@test -n "$(REDIS_URL)" || { echo "set REDIS_URL: every node shares one Redis"; exit 2; }
	@case "$(DATABASE_URL)" in postgresql*) ;; *) \
		echo "set DATABASE_URL to PostgreSQL (postgresql+asyncpg://...): every node shares it"; \
		exit 2;; esac

cluster-up: install cluster-env
	PYTHONPATH=$(CURDIR) $(BIN)/python deploy/local_cluster.py up

cluster-deploy: install
	$(BIN)/python deploy/local_cluster.py deploy $(CLUSTER_CONFIG)

cluster-status: install
	$(BIN)/python deploy/local_cluster.py status

cluster-down: install
	$(BIN)/python deploy/local_cluster.py down

# Ramps load up and down on the local cluster (started for the run unless cluster-up did),
# writes docs/img/autoscale.png and docs/autoscale.csv. About 6 minutes.
demo-autoscale: install cluster-env
	PYTHONPATH=$(CURDIR) HF_HUB_OFFLINE=1 $(BIN)/python loadtests/demo_autoscale.py
