#!/usr/bin/env bash
# Install what rbd needs on a fresh Debian machine (run as root), idempotently:
# the system packages the demo and the tests use for real, and the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# opentracker, mktorrent, aria2: the lab's BitTorrent baseline (bench/lab)
# chromium + fonts-dejavu-core: the web console's end-to-end test drives headless Chromium
# containerd: the registry front door's tests pull through it with ctr (tests/agent/test_mirror.py)
# postgresql: the coordinator's second state backend; the tests run a throwaway server of
# their own from its binaries (src/rainbowd/devcluster/pgserver.py), not the packaged service
APT_PACKAGES=(docker.io docker-registry busybox-static skopeo containerd debootstrap iproute2 openssh-client
  opentracker mktorrent aria2 chromium fonts-dejavu-core postgresql)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install ${missing[*]} (or install them yourself)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.rbd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing rbd into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test,lint]'
  touch "$stamp"
fi
