#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs everything at the tested versions.
# Idempotent: a second run with unchanged constraints.txt / pyproject.toml does nothing.
# Usage: bash scripts/setup.sh            (venv at .venv, or $FACEMAE_VENV)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FACEMAE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.facemae-setup"
want="$(cat "$root/constraints.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

# A new environment takes about 7.5 GiB (torch, Ray, DeepSpeed's build, the MLflow server's venv). Say so
# before pip runs out of space half way ("No space left on device" from pip names neither what nor where).
need_gib=8
if [[ ! -d "$venv" ]]; then
  parent="$(dirname "$venv")"
  while [[ ! -d "$parent" ]]; do parent="$(dirname "$parent")"; done  # the folder pip will create it in
  free_gib=$(( $(df -Pk "$parent" | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
  if (( free_gib < need_gib )); then
    echo "[setup] error: the environment needs about $need_gib GiB free in $parent; $free_gib GiB are free." >&2
    echo "[setup] Free some space there, or point FACEMAE_VENV at a folder on a disk with room." >&2
    exit 1
  fi
fi
echo "[setup] creating environment in $venv (first run takes a few minutes)" >&2
start=$(date +%s)
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=(pip_install -c "$root/constraints.txt")
# This machine's pip config lists local package folders that do not hold every package; pip warns
# once per package about them. Keep real errors, drop that noise.
pip_install() {
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# 1. torch first, pinned: an unpinned torch (or one pulled in by a dependency) is a multi-GB download.
"${pip[@]}" --upgrade "pip>=23" "setuptools>=64" wheel
"${pip[@]}" torch torchvision
# 1b. face detection for `ingest --align` (MTCNN, weights inside the wheel): --no-deps, because its
#     dependencies (torchvision, numpy, Pillow, requests) are ours already and a resolver must not touch torch.
"${pip[@]}" --no-deps facenet-pytorch
# 2. everything DeepSpeed needs at build time and the rest of the stack.
"${pip[@]}" "ray[default,train,tune,data]" timm pyarrow prometheus-client numpy pillow pyyaml \
  safetensors tqdm matplotlib ninja pytest pytest-timeout hjson psutil py-cpuinfo pydantic packaging msgpack einops \
  onnx onnxruntime onnxscript mlflow-skinny tensorboardX "moto[server]" scipy scikit-image \
  mkdocs mkdocs-material "mkdocstrings[python]"
# 3. DeepSpeed builds from source and imports torch in its setup.py: no build isolation, or pip builds
#    it against a second, freshly downloaded torch.
"${pip[@]}" --no-build-isolation deepspeed
# 4. this project, editable, without re-resolving its dependencies.
"${pip[@]}" --no-build-isolation --no-deps -e "$root"
# 5. DeepSpeed's shared-memory collectives compile on their first use (about 30 s on 2 cores): build them
#    now, rather than in the first training job, with the ninja and into the cache every job uses (the
#    environment's own, $venv/torch_extensions: facemae.train.engine.own_build_tools). Where the accelerator
#    has no such op (a GPU machine) there is nothing to build; a failed build is left for DeepSpeed to report.
"$venv/bin/python" - > "$venv/deepspeed-ops.log" 2>&1 <<'PY' || echo "[setup] warning: DeepSpeed's shm op did not build ahead: $venv/deepspeed-ops.log" >&2
from deepspeed.comm.torch import build_shm_op  # what deepspeed.initialize runs: None where there is no such op

from facemae.train.engine import own_build_tools  # the ninja and the cache every job uses

with own_build_tools():
    build_shm_op()
PY
# 6. an MLflow tracking server for the tests, in a venv of its own: the server package pins pyarrow<26,
#    and the project only needs the client (mlflow-skinny). Teams run their tracking server elsewhere.
server="$venv/mlflow-server"
[[ -x "$server/bin/python" ]] || "$python" -m venv "$server"
"$server/bin/python" -m pip install --disable-pip-version-check -q "mlflow==$(grep '^mlflow-skinny==' "$root/constraints.txt" | cut -d= -f3)" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

echo "$want" > "$stamp"
echo "[setup] done in $(( $(date +%s) - start )) s" >&2
