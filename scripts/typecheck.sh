#!/usr/bin/env bash
# mypy --strict over the whole package and the lab and simulator (bench/). mypy cannot follow setuptools'
# package-dir mapping (agent/ -> rainbowd.agent, coordinator/ ->
# rainbowd.coordinator), so this lays the package out as Python sees it, with
# symlinks in a temp dir, checks it there, and maps reported paths back.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
mypy=${MYPY:-$top/.venv/bin/mypy}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/rainbowd"
for f in "$top"/src/rainbowd/*.py; do ln -s "$f" "$tree/rainbowd/"; done
ln -s "$top/agent" "$tree/rainbowd/agent"
ln -s "$top/coordinator" "$tree/rainbowd/coordinator"
ln -s "$top/bench" "$tree/bench"
cd "$tree"
set +e
"$mypy" --config-file "$top/pyproject.toml" --cache-dir "$top/.mypy_cache" -p rainbowd -p bench.lab -p bench.sim -m bench.measures "$@" \
  | sed -e 's#^rainbowd/agent/#agent/#' -e 's#^rainbowd/coordinator/#coordinator/#' \
        -e 's#^rainbowd/#src/rainbowd/#'
exit "${PIPESTATUS[0]}"
