# The two commands of the README, plus the benchmark. Each installs what it needs first
# (tools/setup_host.sh: a venv with the real ComfyUI host, reused across runs).
SETUP := bash tools/setup_host.sh
PYTEST_ARGS ?=

.PHONY: demo test bench bench-cost bench-img2img bench-transfer bench-generalization bench-ceilings setup

setup:
	@$(SETUP) >/dev/null

demo:
	@venv=$$($(SETUP)) && "$$venv/bin/python" benchmarks/demo.py

test:
	@venv=$$($(SETUP)) && cd "$(CURDIR)" && "$$venv/bin/python" -m pytest tests $(PYTEST_ARGS)

bench:
	@venv=$$($(SETUP)) && "$$venv/bin/python" benchmarks/quality.py $(ARGS)

bench-cost:
	@venv=$$($(SETUP)) && "$$venv/bin/python" benchmarks/calibration_cost.py $(ARGS)

bench-img2img:
	@venv=$$($(SETUP)) && "$$venv/bin/python" benchmarks/img2img.py $(ARGS)

bench-transfer:
	@venv=$$($(SETUP)) && "$$venv/bin/python" benchmarks/transfer.py $(ARGS)

bench-generalization:
	@venv=$$($(SETUP)) && "$$venv/bin/python" benchmarks/generalization.py $(ARGS)

bench-ceilings:
	@venv=$$($(SETUP)) && "$$venv/bin/python" benchmarks/ceilings.py $(ARGS)
