#!/usr/bin/env bash
# Create .venv and install the project. `--dev` adds the test tools and, for the
# browser tests, Debian's Chromium (Playwright cannot download browsers offline).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # torch 2.14 and gradio 6 need Python 3.10+; say so before a long failed install
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup: $PY is $("$PY" -V 2>/dev/null || echo "not found"); Python 3.10 or newer is needed (tested on 3.11)." \
         "Point PYTHON at one: PYTHON=python3.11 bash scripts/setup.sh" >&2
    exit 1
  fi
  "$PY" -m venv .venv || { echo "setup: '$PY -m venv' failed; on Debian/Ubuntu: sudo apt-get install python3-venv" >&2
                          rm -rf .venv; exit 1; }
fi
REQ=requirements.txt
[ "${1:-}" = "--dev" ] && REQ=requirements-dev.txt
# torch 2.14.1 with its CUDA libraries is ~6.5 GB installed: warn before pip fails midway on a small disk
if ! .venv/bin/python -c 'import importlib.metadata as m; m.version("torch")' 2>/dev/null; then
  free_gb=$(df -Pk .venv | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "${free_gb:-99}" -lt 7 ]; then
    echo "setup: WARNING: ${free_gb} GB free where .venv is; the packages need about 7 GB" \
         "(torch's CUDA libraries are most of it). If pip stops with 'No space left on device', free space and rerun." >&2
  fi
fi
.venv/bin/python -m pip install --disable-pip-version-check -q -r "$REQ"
if [ "${1:-}" = "--dev" ]; then
  # The browser tests need Chromium; under CI (CI=true) they fail without it, so
  # --dev fails here, at the cause, when it cannot provide a working one.
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: 'apt-get install chromium' failed" >&2
  fi
  if ! version=$(/usr/bin/chromium --headless --no-sandbox --version 2>/dev/null); then
    echo "setup: no working Chromium at /usr/bin/chromium, which the browser tests need" \
         "(install it: sudo apt-get install -y chromium). The Python packages are installed in .venv;" \
         "outside CI the browser tests are skipped without Chromium, under CI (CI=true) they fail." >&2
    exit 1
  fi
  echo "setup: browser tests will use $version (/usr/bin/chromium)"
fi
