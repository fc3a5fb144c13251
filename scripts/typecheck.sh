#!/usr/bin/env bash
# mypy --strict over the whole package (src/rainbowd, every layer) and the lab and
# simulator (bench/). pyproject.toml's mypy_path finds the package under src/.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
mypy=${MYPY:-$top/.venv/bin/mypy}
cd "$top"
exec "$mypy" --config-file pyproject.toml -p rainbowd -p bench.lab -p bench.sim -m bench.measures -m bench.slowdown_floor \
    -m bench.takeover "$@"
