#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything the demo and
# the tests need, on a machine that has only Python 3.11. Idempotent: a second run with the
# environment in place only checks that the pieces import (a few seconds).
#
#   tools/setup_env.sh [VENV_DIR]      (default: .venv in the repository root)
#
# Environment: PYTHON (interpreter to create the venv with, default python3.11 or python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.venv}"
py_boot="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_SPEC='torch>=2.14,<2.15'
TORCHVISION_SPEC='torchvision>=0.29,<0.30'
D2_SPEC='sal-detectron2==0.7.2'

log() { printf '[setup_env] %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv with $py_boot"
  "$py_boot" -m venv "$venv"
fi
py="$venv/bin/python"
# pip install, quiet; the registry mirror's "Location ... is ignored" notes are dropped and the
# full log is shown only when the install fails.
pip_install() {
  local log rc=0
  log="$(mktemp)"
  "$py" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then cat "$log" >&2; else grep -v "is ignored: it is neither" "$log" >&2 || true; fi
  rm -f "$log"
  return "$rc"
}
stamp="$venv/.segdistill-setup"
want="$(cat "$root/requirements.txt" "$root/requirements-test.txt" "$root/pyproject.toml" "${BASH_SOURCE[0]}" | sha1sum | cut -c1-16)"

# Fast path: everything installed by this same recipe and importable.
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && \
   "$py" -c "import torch, torchvision, detectron2, timm, segdistill" 2>/dev/null; then
  exit 0
fi

if ! "$py" -c "import torch, torchvision, sys; v=torch.__version__; sys.exit(0 if v.startswith('2.14') else 1)" 2>/dev/null; then
  log "installing $TORCH_SPEC and $TORCHVISION_SPEC (about 5.5 GB the first time)"
  pip_install "$TORCH_SPEC" "$TORCHVISION_SPEC"
fi

if "$py" -c "import detectron2.modeling, detectron2.projects.deeplab" 2>/dev/null; then
  log "a working detectron2 is already importable: left alone"
else
  log "installing detectron2 from $D2_SPEC (cp310 wheel, pure Python, renamed for this interpreter)"
  tmp="$(mktemp -d)"
  "$py" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
      --python-version 3.10 --platform any -d "$tmp" "$D2_SPEC"
  src="$(ls "$tmp"/sal_detectron2-*.whl | head -n1)"
  mv "$src" "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  pip_install --no-deps "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  rm -rf "$tmp"
fi

log "installing the remaining requirements"
pip_install -r "$root/requirements.txt"

# The test-only oracle (requirements-test.txt): OpenMMLab's packages without their declared
# dependencies (opencv-python would clash with opencv-python-headless), then their pure-Python needs.
log "installing the test oracle (mmsegmentation, mmengine, mmcv-lite; --no-deps)"
oracle="$(grep -E '^(mmsegmentation|mmengine|mmcv-lite)==' "$root/requirements-test.txt")"
others="$(grep -vE '^(#|$|mmsegmentation|mmengine|mmcv-lite)' "$root/requirements-test.txt")"
# shellcheck disable=SC2086
pip_install --no-deps $oracle
# shellcheck disable=SC2086
pip_install $others
pip_install --no-deps -e "$root"

"$py" -c "import torch, torchvision, detectron2, timm, segdistill; print('[setup_env] torch', torch.__version__, '| torchvision', torchvision.__version__, '| detectron2', detectron2.__version__, '| timm', timm.__version__)" >&2
echo "$want" > "$stamp"
