#!/usr/bin/env bash
# Sets fastrsb up on a fresh Debian/Ubuntu machine: the Debian packages FFCV compiles against, then a
# virtual environment .venv with fastrsb and its extras [ffcv,dali,dev]. Safe to run again.
#
#   ./setup.sh                 # everything (about 4 min, ~6.5 GB, most of it torch's CUDA libraries)
#   DALI_EXTRA=dali-cuda130 ./setup.sh   # DALI's CUDA 13 build instead (half the size, matches torch's CUDA 13)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DALI_EXTRA=${DALI_EXTRA:-dali}

if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
  echo "== installing pkg-config, libturbojpeg and OpenCV headers (FFCV compiles against them)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    pkg-config libturbojpeg0-dev libopencv-dev >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision first and pinned together: an unpinned torch pulled in by timm would fetch
# another multi-GB build, and timm needs a torchvision that matches torch.
echo "== installing torch, torchvision"
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
echo "== installing fastrsb[ffcv,$DALI_EXTRA,dev]"
.venv/bin/python -m pip install -q -e ".[ffcv,$DALI_EXTRA,dev]"
.venv/bin/python -c "import ffcv, nvidia.dali, timm, torch; print('fastrsb ready: torch', torch.__version__, '| timm', timm.__version__, '| cuda', torch.cuda.is_available())"
