#!/usr/bin/env bash
# Run the whole test suite (slow multi-process tests included). Creates .venv when missing.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh "test,data,app"
exec python -m pytest -q "$@"
