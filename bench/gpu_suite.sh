#!/usr/bin/env bash
# The GPU suite: every GPU measurement of the project in one command, <= 5 minutes on one H100.
#
#   bash bench/gpu_suite.sh --out DIR [--stages a,b,...] [--merge PREV_DIR]   # on the GPU machine
#   bash bench/gpu_suite.sh --dry_run --out DIR      # every stage at tiny sizes on a CPU (CI runs it; or --dry-run)
#   bash bench/gpu_suite.sh --list                   # the stages and their time boxes
#
# The stages, their time boxes and how they are isolated are in bench/gpu_suite.py (STAGES);
# DIR receives summary.json, results.json, results.md, suite.png and suite.log.
#
# On the GPU machine this uses its own python3 (torch is never installed), installs the wheels
# that `make gpu-wheels` put in .whl/ into a private folder, and runs the repository from its
# source tree through PYTHONPATH (no `pip install -e .`). The dry run uses the project's .venv.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run=0
for arg in "$@"; do
  [[ "$arg" == "--dry-run" || "$arg" == "--dry_run" ]] && dry_run=1
done
if (( dry_run )) && [[ -x "$repo/.venv/bin/python" ]]; then
  python="$repo/.venv/bin/python"
else
  python="${PYTHON:-python3}"
fi
site=""
if (( ! dry_run )) && compgen -G "$repo/.whl/*.whl" > /dev/null; then
  site="${GEM_FAST_SITE:-/tmp/gem_fast_site}"
  PIP_ROOT_USER_ACTION=ignore "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "$repo"/.whl/*.whl
fi
# The source tree first: gem_fast and bench come from it, whatever else is installed.
export PYTHONPATH="$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$repo"
exec "$python" -m bench.gpu_suite "$@"
