#!/usr/bin/env bash
# Point a VM at a blockfs-mounted image: make an image, mount it, boot a throwaway guest (QEMU,
# TCG, no network) whose disk is MNT/vm and back the disk up live while the guest writes to it;
# then boot another guest that makes and fills an ext2 file system; unmount, and check the backup
# and the image from the host with qemu-img and e2fsprogs.
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

GUEST=
cleanup() {
    # Stop a guest still running (its kit kills QEMU on SIGTERM), then never leave a FUSE mount
    # behind, whatever failed above.
    exec 3>&- 4<&- || true
    if [ -n "$GUEST" ] && kill -0 "$GUEST" 2>/dev/null; then
        kill "$GUEST" || true
        wait "$GUEST" || true
    fi
    if mountpoint -q "$MNT"; then
        "${BLOCKFS[@]}" umount "$MNT" || fusermount3 -u -z "$MNT" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "create a 64 MiB $FORMAT image full of data (zeros would leave the backup nothing to copy)"
{ yes "blockfs example data" || true; } | head -c 64M >"$WORK/fill.raw"
qemu-img convert -f raw -O "$FORMAT" "$WORK/fill.raw" "$IMAGE"
rm "$WORK/fill.raw"
qemu-img info "$IMAGE" | sed 's/^/   /'

step "prepare the guest kernel (cached after the first run)"
$PY -m tests.guestvm prepare

step "mount it with blockfs: $MNT/vm"
"${BLOCKFS[@]}" mount --log "$WORK/blockfs.log" "$MNT" "vm=$IMAGE,format=$FORMAT"
ls -l "$MNT"

step "live backup: boot a guest in the background on $MNT/vm; it writes BEFORE markers, then waits"
# The guest and this script take turns through two FIFOs: the guest kit prints
# "guestvm: phase=NAME" when the guest has written (and synced) a phase, and lets it go on when
# we write "go". No sleeps: every wait below is a blocking read with a timeout.
mkfifo "$WORK/to-guest" "$WORK/from-guest"
$PY -u -m tests.guestvm run --workload markers --disk "$MNT/vm:cache=none" --handshake \
    --verify "$MNT/vm" --timeout 240 <"$WORK/to-guest" >"$WORK/from-guest" 2>&1 &
GUEST=$!
exec 3>"$WORK/to-guest" 4<"$WORK/from-guest"

guest_reaches() {
    local line
    while IFS= read -r -t 180 line <&4; do
        printf '   guest: %s\n' "$line"
        [ "$line" = "guestvm: phase=$1" ] && return 0
    done
    echo "the guest never reached phase $1" >&2
    return 1
}
guest_reaches before-written

# The guest is parked: keep a copy of the disk as it is now, what the backup must equal.
cp "$MNT/vm" "$WORK/at-start.raw"

step "start the backup (rate-limited, so it is still copying while the guest writes)"
"${BLOCKFS[@]}" job start backup "$MNT" device=vm target="$WORK/backup.qcow2" sync=full speed=8M
echo "   $MNT/.control/jobs/vm/status:"
sed 's/^/   /' "$MNT/.control/jobs/vm/status"; echo

step "let the guest write AFTER markers all over the disk while the job runs"
echo go >&3
guest_reaches after-written
sed 's/^/   /' "$MNT/.control/jobs/vm/status"; echo
"${BLOCKFS[@]}" job list "$MNT"

step "watch the job to its end (blockfs job watch)"
"${BLOCKFS[@]}" job watch "$MNT" vm --interval 1 --timeout 120
sed 's/^/   /' "$MNT/.control/jobs/vm/status"; echo
tail -n 4 "$MNT/.control/events" | sed 's/^/   /'
echo dismiss >"$MNT/.control/jobs/vm/ctl"

step "let the guest power off; the guest kit checks the AFTER markers through the mount"
echo go >&3
cat <&4 | sed 's/^/   guest: /'
exec 3>&- 4<&-
wait "$GUEST"
GUEST=

step "boot a second guest on $MNT/vm: it makes an ext2 file system (cache=none: O_DIRECT)"
$PY -m tests.guestvm run --workload ext2 --disk "$MNT/vm:cache=none" --verify "$MNT/vm"

step "unmount"
"${BLOCKFS[@]}" umount "$MNT"

step "check the backup without blockfs: qemu-img check, and equal to the disk when it started"
qemu-img check "$WORK/backup.qcow2" | sed 's/^/   /'
qemu-img compare -f qcow2 -F raw "$WORK/backup.qcow2" "$WORK/at-start.raw" | sed 's/^/   /'
qemu-img convert -f qcow2 -O raw "$WORK/backup.qcow2" "$WORK/backup.raw"
printf '   lines with BEFORE: %s, with AFTER: %s\n' \
    "$(grep -ac BEFORE "$WORK/backup.raw" || true)" "$(grep -ac AFTER "$WORK/backup.raw" || true)"

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
