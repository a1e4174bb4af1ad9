#!/usr/bin/env bash
# Sets up the environment if needed, then runs the main job on the embedded default
# (synthetic faces, a local Ray cluster started by the job). Extra arguments go to jobs/train.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${FACEMAE_VENV:-$root/.venv}/bin/python" jobs/train.py "$@"
