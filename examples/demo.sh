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

step "qcow2: a 64 MiB base with data, and an overlay on it (blockfs create)"
"${BLOCKFS[@]}" create -f qcow2 "$WORK/base.qcow2" 64M
qemu-io -c 'write -P 0x5a 0 32M' "$WORK/base.qcow2" | head -1
"${BLOCKFS[@]}" create -f qcow2 -b "$WORK/base.qcow2" -F qcow2 "$WORK/top.qcow2"
"${BLOCKFS[@]}" mount --log "$WORK/blockfs.log" "$MNT" "vm=$WORK/top.qcow2"
echo "the mounted file is the guest view of the whole chain:"
"${BLOCKFS[@]}" info --backing-chain "$WORK/top.qcow2" | sed 's/^/   /'
dd if="$WORK/payload" of="$MNT/vm" bs=1M count=8 seek=16 conv=notrunc,fsync status=none
echo "where the data lies (the map file: qemu-img map's JSON), and a live internal snapshot:"
head -n 3 "$MNT/.control/images/vm/map" | sed 's/^/   /'
echo "create before-backup" > "$MNT/.control/images/vm/snapshots"
"${BLOCKFS[@]}" snapshot -l "$WORK/top.qcow2" | sed 's/^/   /'
cp "$MNT/vm" "$WORK/vm-before-backup.raw"

step "Live backup: start it, write over the disk while it runs, prove it with qemu-img compare"
"${BLOCKFS[@]}" job start backup "$MNT" device=vm "target=$WORK/backup.qcow2" sync=full speed=24M
(for i in $(seq 1 40); do
   dd if=/dev/urandom of="$MNT/vm" bs=64k count=4 seek=$((RANDOM % 1000)) conv=notrunc status=none
 done) &
WRITER=$!
cat "$MNT/.control/jobs/vm/status"
"${BLOCKFS[@]}" job watch "$MNT" vm
wait $WRITER
grep -c BLOCK_JOB_COMPLETED "$MNT/.control/events" >/dev/null && tail -n 3 "$MNT/.control/events"
"${BLOCKFS[@]}" job dismiss "$MNT" vm
"${BLOCKFS[@]}" umount "$MNT"
echo "the backup is the disk as it was when the job started, although writes went on:"
qemu-img compare -F raw "$WORK/backup.qcow2" "$WORK/vm-before-backup.raw"
qemu-img check "$WORK/backup.qcow2"
qemu-img check "$WORK/top.qcow2"
"${BLOCKFS[@]}" check "$WORK/top.qcow2"   # the same report, by blockfs
if qemu-img compare -q "$WORK/top.qcow2" "$WORK/vm-before-backup.raw"; then
  echo "unexpected: the live disk did not change"; exit 1
else
  echo "and the live disk did change: the writes during the job went to it, not to the backup."
fi

step "Live mirror: move the disk to a new image while it is written, then switch over"
"${BLOCKFS[@]}" mount --log "$WORK/blockfs.log" "$MNT" "vm=$WORK/top.qcow2,format=qcow2"
exec 5<>"$MNT/vm"   # a handle held open across the switch, as a VM would hold it
"${BLOCKFS[@]}" job start mirror "$MNT" device=vm "target=$WORK/moved.qcow2" sync=full speed=32M
(for i in $(seq 1 40); do
   dd if=/dev/urandom of="$MNT/vm" bs=64k count=4 seek=$((RANDOM % 1000)) conv=notrunc status=none
 done) &
WRITER=$!
"${BLOCKFS[@]}" job wait "$MNT" vm --until ready
wait $WRITER
echo "ready: the target is in sync and kept so; now switch over"
"${BLOCKFS[@]}" job complete "$MNT" vm
"${BLOCKFS[@]}" job wait "$MNT" vm
printf 'written after the switch through the old handle\n' | dd of=/dev/fd/5 bs=1M seek=60 oflag=seek_bytes conv=notrunc status=none
exec 5>&-
tail -n 2 "$MNT/.control/events"
echo "the mounted file now reads and writes:"
python3 -c 'import json,sys; print("  ", json.load(sys.stdin)["filename"])' < "$MNT/.control/images/vm/info"
cp "$MNT/vm" "$WORK/vm-final.raw"
"${BLOCKFS[@]}" job dismiss "$MNT" vm
"${BLOCKFS[@]}" umount "$MNT"
qemu-img compare -F raw "$WORK/moved.qcow2" "$WORK/vm-final.raw"
qemu-img check "$WORK/moved.qcow2"
echo "the old image was left as it was at the switch (no later write reached it):"
if qemu-img compare -q -F raw "$WORK/top.qcow2" "$WORK/vm-final.raw"; then
  echo "unexpected: the old image got the write made after the switch"; exit 1
fi
qemu-img check "$WORK/top.qcow2"

step "Live chain surgery: external snapshots, an intermediate commit, an active commit, a stream"
"${BLOCKFS[@]}" mount --log "$WORK/blockfs.log" "$MNT" "vm=$WORK/moved.qcow2,format=qcow2"
scribble() {  # a writer that keeps going while a job runs
  for i in $(seq 1 "$1"); do
    dd if=/dev/urandom of="$MNT/vm" bs=64k count=2 seek=$((RANDOM % 1000)) conv=notrunc status=none
  done
}
chain() {
  python3 -c '
import json, sys
layer, names = json.load(sys.stdin), []
while layer:
    names.append(layer["filename"].rsplit("/", 1)[1])
    layer = layer.get("backing-image")
print("   chain:", " <- ".join(reversed(names)))' < "$MNT/.control/images/vm/info"
}
"${BLOCKFS[@]}" snapshot --external snap1.qcow2 "$MNT/vm"
scribble 20
echo "snapshot=snap2.qcow2" > "$MNT/.control/images/vm/ctl"   # the same, with echo
scribble 20
chain
echo "fold snap1 into moved.qcow2 while the disk is written (snap2 then names moved.qcow2):"
"${BLOCKFS[@]}" job start commit "$MNT" device=vm top=snap1.qcow2 base=moved.qcow2 speed=16M
scribble 20
"${BLOCKFS[@]}" job wait "$MNT" vm
"${BLOCKFS[@]}" job dismiss "$MNT" vm
chain
echo "active commit: snap2 into moved.qcow2, ready, complete (the device reads moved.qcow2 again):"
"${BLOCKFS[@]}" job start commit "$MNT" device=vm base=moved.qcow2
scribble 10
"${BLOCKFS[@]}" job wait "$MNT" vm --until ready
"${BLOCKFS[@]}" job complete "$MNT" vm
"${BLOCKFS[@]}" job wait "$MNT" vm
"${BLOCKFS[@]}" job dismiss "$MNT" vm
chain
echo "stream: a new snapshot pulls everything up from moved.qcow2 and stands alone:"
"${BLOCKFS[@]}" snapshot --external snap3.qcow2 "$MNT/vm"
"${BLOCKFS[@]}" job start stream "$MNT" device=vm
scribble 10
"${BLOCKFS[@]}" job wait "$MNT" vm
chain
cp "$MNT/vm" "$WORK/chain-final.raw"
"${BLOCKFS[@]}" umount "$MNT"
qemu-img info "$WORK/snap3.qcow2" | grep -E "^image|backing" | sed 's/^/   /'
qemu-img check "$WORK/snap3.qcow2"
qemu-img compare -F raw "$WORK/snap3.qcow2" "$WORK/chain-final.raw"
for f in moved snap1 snap2; do qemu-img check -q "$WORK/$f.qcow2" && echo "   $f.qcow2: qemu-img check clean"; done

step "VHDX (Hyper-V): a dynamic parent written by qemu-io, a differencing child made by blockfs"
"${BLOCKFS[@]}" create -f vhdx "$WORK/parent.vhdx" 64M -o block_size=8M
qemu-io -f vhdx -c 'write -P 0x7e 0 24M' "$WORK/parent.vhdx" | head -1
"${BLOCKFS[@]}" create -f vhdx -b "$WORK/parent.vhdx" "$WORK/child.vhdx"
"${BLOCKFS[@]}" info "$WORK/child.vhdx" | sed 's/^/   /'
echo "libvhdi, an independent reader, sees a differencing image:"
vhdiinfo "$WORK/child.vhdx" | grep -iE "disk type|parent filename" | sed 's/^/   /'
"${BLOCKFS[@]}" mount --read-only --log "$WORK/blockfs.log" "$MNT" "child=$WORK/child.vhdx,format=vhdx"
qemu-img convert -f vhdx -O raw "$WORK/parent.vhdx" "$WORK/parent.raw"
cmp "$MNT/child" "$WORK/parent.raw" && echo "the mounted child reads through to its parent, byte for byte"
"${BLOCKFS[@]}" umount "$MNT"

step "Shown: raw, qcow2 and VHDX images mounted as files, written by dd and qemu-io, a live
   backup, a live mirror with switch-over, snapshots, commits and a stream on a disk in use,
   all proven by qemu-img, cmp and libvhdi."
