#!/usr/bin/env bash
# Install what khofs needs on Debian and build its virtualenv in .venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# khofs run: kexec-tools and strace are test clients, python3-seccomp builds the filter,
# libc6-dev lets the tests build static C clients.
pkgs=(libfuse3-dev fuse3 pkg-config device-tree-compiler busybox python3-venv python3-dev gcc
      kexec-tools strace python3-seccomp libc6-dev util-linux)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    # kexec-tools must never load a kernel into the host at boot.
    echo "kexec-tools kexec-tools/load_kexec boolean false" | $sudo debconf-set-selections
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
stamp=.venv/.khofs-installed
# Wheels of all the venv needs (pyfuse3's built here from its sdist), kept on this machine
# after an install from the package index, so that a clone can build its venv when no index
# is reachable.
wheels=${KHOFS_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/khofs/wheels}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing khofs and its Python dependencies into .venv" >&2
    if .venv/bin/pip install -q --no-binary pyfuse3 -e '.[test,plot]' >.venv/pip.log 2>&1; then
        mkdir -p "$wheels"
        # hatchling and editables: the editable install's build backend
        if ! .venv/bin/pip wheel -q --no-binary pyfuse3 -w "$wheels" '.[test,plot]' hatchling \
                editables >>.venv/pip.log 2>&1; then
            echo "setup: warning: could not keep the wheels in $wheels (see .venv/pip.log)" >&2
        fi
        rm -f "$wheels"/khofs-*.whl
    elif ls "$wheels"/*.whl >/dev/null 2>&1 && .venv/bin/pip install -q --no-index \
            --find-links "$wheels" -e '.[test,plot]' >>.venv/pip.log 2>&1; then
        echo "setup: no package index answered; installed from the wheels kept in $wheels" >&2
    else
        cat .venv/pip.log >&2
        exit 1
    fi
    touch "$stamp"
fi
# libseccomp's own binding (Debian's python3-seccomp): the PyPI wrappers lack get_notify_fd
# (pyseccomp) or a wheel for this Python (seccomp).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
for so in /usr/lib/python3/dist-packages/seccomp.cpython-*.so; do
    [ -e "$so" ] && ln -sf "$so" "$site/"
done
if [ -f /etc/default/kexec ] && grep -q '^LOAD_KEXEC=true' /etc/default/kexec; then
    echo "setup: warning: /etc/default/kexec has LOAD_KEXEC=true; khofs never needs it" >&2
fi
# Every mount starts a daemon that imports khofs: with PYTHONDONTWRITEBYTECODE set, an
# editable install would compile it from source each time (~80 ms of every mount).
.venv/bin/python -m compileall -q khofs >/dev/null
