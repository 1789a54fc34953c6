#!/usr/bin/env bash
# Create .venv and install the project. `--dev` adds the test tools and, for the
# browser tests, Debian's Chromium (Playwright cannot download browsers offline).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
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
