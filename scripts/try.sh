#!/usr/bin/env bash
# Set everything up and mount a default khofs instance (kho=on) at ${1:-/tmp/khofs}.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
mnt=${1:-/tmp/khofs}
mkdir -p "$mnt"
if mountpoint -q "$mnt" 2>/dev/null || ! ls "$mnt" >/dev/null 2>&1; then
    .venv/bin/khofs umount "$mnt"
fi
.venv/bin/khofs mount "$mnt"
echo "khofs mounted at $mnt; try: cat $mnt/kho/out/scratch_phys; echo 1 > $mnt/kho/out/finalize"
echo "unmount with: .venv/bin/khofs umount $mnt"
