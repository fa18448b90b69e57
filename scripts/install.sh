#!/usr/bin/env bash
# Make khofs available system-wide: /usr/local/bin/khofs (mount(8) and fstab run it from
# there) and the systemd units. Run after scripts/setup.sh, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
ln -sf "$PWD/.venv/bin/khofs" /usr/local/bin/khofs
if [ -d /etc/systemd/system ]; then
    install -m 0644 systemd/khofs.service systemd/khofs@.service /etc/systemd/system/
    mkdir -p /etc/khofs
    [ -e /etc/khofs/khofs.conf ] || install -m 0644 systemd/khofs.conf.example /etc/khofs/khofs.conf
    systemctl daemon-reload 2>/dev/null || true
fi
echo "installed: /usr/local/bin/khofs and the khofs units"
