#!/usr/bin/env bash
# Regenerate docs/img/khofs-map.png: `khofs map --png` of a 1 GiB mount with preserved memory.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
k=.venv/bin/khofs
# The picture's title names the mount point: a fixed one keeps it the same from run to run.
mnt=/tmp/khofs-map
mkdir -p "$mnt"
trap '$k umount "$mnt" >/dev/null 2>&1 || true' EXIT
$k mount "$mnt" --memory 1G --cmdline "kho=on kho_scratch=16M,64M,16M reserve_mem=4M:4096:oops"
folio=$($k ctl "$mnt" mem alloc 2M)
$k ctl "$mnt" preserve-folio "$folio" 9
pages=$($k ctl "$mnt" mem alloc 12K)
$k ctl "$mnt" preserve "$pages" 12K
echo 1 > "$mnt/kho/out/finalize"
mkdir -p docs/img
$k map "$mnt" --png docs/img/khofs-map.png
