# The two commands of the quick start. Each installs what it needs first.
.PHONY: demo test setup lint type bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/rbd demo

# The whole suite: unit + integration (real processes, real dockerd), lint, types.
test: setup
	.venv/bin/pytest -q -ra
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	bash scripts/typecheck.sh

bench: setup
	.venv/bin/python bench/transfer_bench.py

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
