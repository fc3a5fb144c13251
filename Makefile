# The two commands of the quick start. Each installs what it needs first.
.PHONY: demo test setup lint type bench clean wheel

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/rbd demo

# The whole suite: unit + integration (real processes, real dockerd), lint, types.
# --durations: the 25 slowest tests at the end, to watch CI's 15-minute budget by.
test: setup
	.venv/bin/pytest -q -ra --durations=25
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	bash scripts/typecheck.sh

# The wheel deploy/INSTALL.md installs on every host: dist/rainbowd-<version>-py3-none-any.whl.
# Needs only python3 with venv and the package index (pip fetches the build backend), not
# `make setup`. build/lib is cleared first so a module deleted from the tree cannot linger in it.
wheel:
	@test -x build/venv/bin/pip || python3 -m venv build/venv
	rm -rf build/lib build/bdist.* dist/rainbowd-*.whl
	build/venv/bin/pip wheel -q --no-deps -w dist .
	@ls dist/rainbowd-*.whl

bench: setup
	.venv/bin/python bench/transfer_bench.py

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build dist
