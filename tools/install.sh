#!/usr/bin/env bash
# Sets up .venv on a fresh machine: torch + torchvision, mmcv 2.1.0 built from its sdist with compiled ops
# (no wheel exists for current torch), then densevision editable with its dev extra.
# Safe to re-run: each step checks what is there; the mmcv wheel is cached per mmcv + torch + CUDA + Python.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_PINS=${TORCH_PINS:-"torch==2.14.0 torchvision==0.29.2"}
MMCV_VERSION=2.1.0
CACHE=${DENSEVISION_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/densevision}

log() { printf '[install] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip() { "$PY" -m pip --disable-pip-version-check "$@"; }

# torch 2.14 needs setuptools >= 77; mmcv's setup.py imports pkg_resources, which setuptools 81 removed.
# ninja parallelises the ops build.
pip install -q "pip>=24" "setuptools>=77,<81" wheel ninja

log "installing $TORCH_PINS (several GB the first time, nothing when already there)"
# shellcheck disable=SC2086
pip install -q $TORCH_PINS

# CUDA ops only where they can be built and used: a visible GPU and nvcc.
read -r TORCH_VERSION TORCH_CUDA PY_TAG < <("$PY" - <<'EOF'
import sys, torch
print(torch.__version__, torch.version.cuda or "none", f"cp{sys.version_info.major}{sys.version_info.minor}")
EOF
)
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && command -v nvcc >/dev/null; then
  OPS=cuda${TORCH_CUDA}
  export FORCE_CUDA=1
else
  OPS=cpu
  export FORCE_CUDA=0
fi
KEY="mmcv-${MMCV_VERSION}_torch-${TORCH_VERSION}_${OPS}_${PY_TAG}"
WHEEL_DIR="$CACHE/wheels/$KEY"

if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
  log "building mmcv $MMCV_VERSION with $OPS ops against torch $TORCH_VERSION (about 15 minutes on 2 cores)"
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  # --no-build-isolation: setup.py imports the torch we just installed to pick the ops.
  pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$BUILD" "mmcv==$MMCV_VERSION"
  tar -xzf "$BUILD/mmcv-$MMCV_VERSION.tar.gz" -C "$BUILD"
  SRC="$BUILD/mmcv-$MMCV_VERSION"
  # torch >= 2.14 headers refuse anything below C++20; older torch still accepts it.
  sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$SRC/setup.py"
  grep -q "std=c++20" "$SRC/setup.py" \
    || { echo "[install] mmcv $MMCV_VERSION setup.py did not take the C++ standard patch; see tools/install.sh" >&2; exit 1; }
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$BUILD/dist" "$SRC"
  mkdir -p "$CACHE/wheels"
  # Publish by rename so an interrupted build never leaves a half-written cache entry.
  mkdir "$BUILD/out" && mv "$BUILD"/dist/mmcv-*.whl "$BUILD/out/"
  rm -rf "$WHEEL_DIR" && mv "$BUILD/out" "$WHEEL_DIR"
fi

INSTALLED_KEY=$(cat "$VENV/.mmcv-key" 2>/dev/null || true)
if [ "$INSTALLED_KEY" != "$KEY" ]; then
  log "installing cached $KEY"
  pip uninstall -q -y mmcv 2>/dev/null || true
  pip install -q "$WHEEL_DIR"/mmcv-*.whl
  echo "$KEY" >"$VENV/.mmcv-key"
fi

log "installing densevision (editable, with dev extra)"
pip install -q -e ".[dev]"
"$PY" -c "import mmcv.ops, mmdet.models, mmseg.models, segment_anything, openslide, rasterio, densevision"
log "ready: $("$VENV/bin/densevision" --version)"
