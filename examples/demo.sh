#!/usr/bin/env bash
# blockfs demo: mount disk images as plain files, use them with ordinary tools, prove the data
# with qemu-img, and show the control files. Runs in a scratch folder, cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
BLOCKFS=(.venv/bin/python -m blockfs)
WORK=$(mktemp -d /tmp/blockfs-demo.XXXXXX)
MNT=$WORK/mnt
mkdir -p "$MNT"
cleanup() {
  if grep -qs " $MNT fuse" /proc/mounts; then "${BLOCKFS[@]}" umount "$MNT" || fusermount3 -u -z "$MNT"; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Make two images: a 64 MiB raw disk and a 20000001-byte odd-sized one"
qemu-img create -q -f raw "$WORK/disk0.img" 64M
head -c 20000001 /dev/urandom > "$WORK/odd.img"
head -c 48M /dev/urandom > "$WORK/payload"

step "Mount them: blockfs mount $MNT disk0=... odd=..."
"${BLOCKFS[@]}" mount --log "$WORK/blockfs.log" "$MNT" "disk0=$WORK/disk0.img" "odd=$WORK/odd.img"
ls -l "$MNT"

step "Copy data in with dd, then judge with qemu-img compare"
dd if="$WORK/payload" of="$MNT/disk0" bs=1M conv=notrunc,fsync status=none
head -c 64M /dev/zero > "$WORK/expected"
dd if="$WORK/payload" of="$WORK/expected" bs=1M conv=notrunc status=none
qemu-img compare -f raw -F raw "$MNT/disk0" "$WORK/expected"
qemu-img compare -f raw -F raw "$MNT/odd" "$WORK/odd.img"

step "Write a pattern with qemu-io through the mount and read it back"
qemu-io -f raw -c 'write -P 0xab 1M 64k' "$MNT/disk0" | head -1
qemu-io -f raw -c 'read -P 0xab 1M 64k' "$MNT/disk0" | head -1

step "The control files: info and stats"
cat "$MNT/.control/images/disk0/info"
cat "$MNT/.control/images/disk0/stats"

step "Unmount (flushes every image), and check the image file itself"
"${BLOCKFS[@]}" umount "$MNT"
qemu-io -f raw -c 'read -P 0xab 1M 64k' "$WORK/disk0.img" | head -1
cmp -n $((1024*1024)) "$WORK/disk0.img" "$WORK/payload" && echo "first MiB of disk0.img is the payload"

step "Shown: images mounted as files, written by dd and qemu-io, proven by qemu-img compare."
