#!/usr/bin/env bash
# Set everything up and mount a khofs instance at ${1:-/tmp/khofs} with the command line the
# README's tour starts from; a mount already there is replaced, so it can run again.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
mnt=${1:-/tmp/khofs}
mkdir -p "$mnt"
if mountpoint -q "$mnt" 2>/dev/null || ! ls "$mnt" >/dev/null 2>&1; then
    .venv/bin/khofs umount "$mnt"
fi
.venv/bin/khofs mount "$mnt" --cmdline "kho=on kho_scratch=16M,64M,16M reserve_mem=4M:4096:oops" \
    --memory 1G
echo "khofs mounted at $mnt (khofs is $PWD/.venv/bin/khofs)"
echo "unmount with: .venv/bin/khofs umount $mnt"
