#!/usr/bin/env bash
# The whole pipeline at smoke size (every stage, a report written) in about a minute:
# what CI runs in a clean venv with exactly ./run.sh's extras, to prove they are enough.
# Usage: scripts/smoke.sh OUT_DIR   (uses MOEFORGE_VENV, default .venv, like run.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/smoke.sh OUT_DIR}"
source scripts/venv.sh "$(sed -n 's/^source scripts\/venv.sh "\([^"]*\)".*/\1/p' run.sh)"
rm -rf "$out"
moeforge run --config configs/tiny.toml --train.out_dir "$out" --data.data_dir "$out/data" \
  --data.builtin_mb 0.5 --train.steps 12 --train.eval_every 6 --train.log_every 6 --train.progress false \
  --sft.steps 6 --sft.eval_problems 8 --reward.steps 6 --reward.generated_pairs 120 \
  --grpo.steps 2 --grpo.eval_problems 8
for f in report.md report.html stages/data.json stages/pretrain.json stages/sft.json stages/reward.json \
         stages/grpo.json stages/eval.json stages/report.json; do
  [ -s "$out/tiny/$f" ] || { echo "[smoke] missing $out/tiny/$f" >&2; exit 1; }
done
echo "[smoke] pipeline complete: $out/tiny/report.html"
