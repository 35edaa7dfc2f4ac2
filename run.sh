#!/usr/bin/env bash
# The main job: the whole moeforge recipe on built-in data, on CPU. Creates .venv when missing.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh "data,app"
exec moeforge run --config configs/tiny.toml "$@"
