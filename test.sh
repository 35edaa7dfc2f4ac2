#!/usr/bin/env bash
# Run the whole test suite (slow multi-process tests included). Creates .venv when missing.
# The browser test drives Debian's chromium through Playwright (no browser download); when
# chromium is missing and we are root, it is installed once with apt-get.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh "test,data,app"
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[moeforge] installing Debian chromium for the browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[moeforge] could not install chromium; the browser test will be skipped with that reason"
fi
exec python -m pytest -q "$@"
