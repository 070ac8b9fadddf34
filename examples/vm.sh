#!/usr/bin/env bash
# Point a VM at a blockfs-mounted image: make an image, mount it, boot a throwaway guest (QEMU,
# TCG, no network) whose disk is MNT/vm, let it make and fill an ext2 file system, power off,
# unmount, and check the image from the host.
#
# Usage: examples/vm.sh [raw|qcow2]     (run from anywhere; needs `make setup` done)
#
# The guest kit (tests/guestvm.py) fetches a Debian cloud kernel once with apt-get download and
# caches it under .cache/vm; later runs boot in a few seconds.
set -euo pipefail

cd "$(dirname "$0")/.."
FORMAT=${1:-raw}
PY=.venv/bin/python
BLOCKFS=(.venv/bin/blockfs)

WORK=$(mktemp -d /tmp/blockfs-vm.XXXXXX)
MNT=$WORK/mnt
IMAGE=$WORK/disk.$FORMAT
mkdir -p "$MNT"

cleanup() {
    # Never leave a FUSE mount behind, whatever failed above.
    if mountpoint -q "$MNT"; then
        "${BLOCKFS[@]}" umount "$MNT" || fusermount3 -u -z "$MNT" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "create a 64 MiB $FORMAT image"
qemu-img create -q -f "$FORMAT" "$IMAGE" 64M
qemu-img info "$IMAGE" | sed 's/^/   /'

step "prepare the guest kernel (cached after the first run)"
$PY -m tests.guestvm prepare

step "mount it with blockfs: $MNT/vm"
"${BLOCKFS[@]}" mount --log "$WORK/blockfs.log" "$MNT" "vm=$IMAGE,format=$FORMAT"
ls -l "$MNT"

# ---- LIVE BACKUP GOES HERE (jobs issue) -----------------------------------------------------
# When jobs land: start a backup of vm through $MNT/.control while the guest below is running,
# then show the job status files, e.g. `cat $MNT/.control/jobs/*/status`. The guest would have
# to run in the background for that (`$PY -m tests.guestvm run ... &`, wait on its pid).
# ---------------------------------------------------------------------------------------------

step "boot the guest on $MNT/vm (cache=none: QEMU opens it with O_DIRECT)"
$PY -m tests.guestvm run --workload ext2 --disk "$MNT/vm:cache=none" --verify "$MNT/vm"

step "unmount"
"${BLOCKFS[@]}" umount "$MNT"

step "check the image without blockfs"
if [ "$FORMAT" = raw ]; then
    CHECK=$IMAGE
else
    CHECK=$WORK/converted.raw
    qemu-img convert -f "$FORMAT" -O raw "$IMAGE" "$CHECK"
fi
e2fsck -fn "$CHECK"
debugfs -R 'ls -l /dir' "$CHECK" 2>/dev/null
printf 'hello.txt says: '
debugfs -R 'cat /hello.txt' "$CHECK" 2>/dev/null
