#!/usr/bin/env bash
# Shared by run.sh and test.sh: create .venv once and (re)install the project only when
# pyproject.toml changed, so both commands are quick to re-run.
# Usage: source scripts/venv.sh EXTRAS   (e.g. "test,data")
# MOEFORGE_VENV=DIR puts the environment elsewhere (CI builds a second, clean one with only
# ./run.sh's extras, to prove they are enough).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
py="${PYTHON:-python3}"
venv="${MOEFORGE_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[moeforge] creating $venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
stamp="$venv/.moeforge-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -d' ' -f1) [$extras]"
if [ ! -f "$stamp" ] || ! grep -qxF -- "$want" "$stamp"; then
  echo "[moeforge] installing moeforge[$extras] into $venv (torch==2.13.0 CPU wheel)"
  # torch first and pinned, so nothing can pull a multi-GB CUDA build.
  "$venv/bin/pip" install -q "torch==2.13.0"
  spec="$root"
  [ -n "$extras" ] && spec="$root[$extras]"
  "$venv/bin/pip" install -q -e "$spec"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
