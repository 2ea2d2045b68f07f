#!/usr/bin/env bash
# Installs what the browser tests need: Debian's Chromium and the Python playwright package
# (never `playwright install`, which downloads a browser build this machine cannot fetch).
set -euo pipefail
PY=${1:-.venv/bin/python}
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "install-browser: chromium is missing and cannot be installed here; browser tests will be skipped" >&2
    fi
fi
"$PY" -c "import playwright" 2>/dev/null || "$PY" -m pip install -q playwright
