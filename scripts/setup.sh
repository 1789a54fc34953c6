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
.venv/bin/python -m pip install --disable-pip-version-check -q -r "$REQ"
if [ "${1:-}" = "--dev" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; browser tests will be skipped" >&2
  else
    echo "setup: /usr/bin/chromium missing (run: sudo apt-get install -y chromium); browser tests will be skipped" >&2
  fi
fi
