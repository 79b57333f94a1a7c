#!/bin/sh
# Runs inside the VM: fio on the raw virtio disk (/dev/vda) and on the ublk
# front device of an identical disk (/dev/vdb attached as /dev/ublkb0),
# interleaved job by job and round by round, because TCG timing is noisy.
# Where the kernel serves zero copy, a third identical disk (/dev/vdc) is
# attached with --copy, so both data paths are measured in the same run.
# Then the same over null_blk (memory backed): the front device of
# /dev/nullb1 against raw /dev/nullb0, where the disk's own emulation cost
# vanishes and what is left is the server's. Last, the servers' memory.
set -e
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
ATTACH=${ATTACH:-} # extra attach flags (frontbench -attach)
dbdctl attach $ATTACH /dev/vdb 0 >/dev/null
field() { dbdctl info "$1" | sed -n "s/.*\"$2\": *\"*\([^\",]*\)\"*,*$/\1/p"; }
datapath=$(field 0 data_path)
echo "@@DATAPATH $datapath $(uname -r)"
targets="raw front"
if [ "$datapath" = zero-copy ]; then
	dbdctl attach $ATTACH --copy /dev/vdc 1 >/dev/null
	targets="$targets copy"
fi
modprobe null_blk nr_devices=2 gb=1 bs=512 memory_backed=1 queue_mode=2 hw_queue_depth=128 submit_queues=2
dbdctl attach $ATTACH /dev/nullb1 2 >/dev/null
targets="$targets nullraw nullfront"
dev_of() {
	case $1 in
	raw) echo /dev/vda ;; front) echo /dev/ublkb0 ;; copy) echo /dev/ublkb1 ;;
	nullraw) echo /dev/nullb0 ;; nullfront) echo /dev/ublkb2 ;;
	esac
}
minor_of() {
	case $1 in front) echo 0 ;; copy) echo 1 ;; nullfront) echo 2 ;; *) echo "" ;; esac
}
cpu() { # server CPU ticks (utime + stime) of minor $1, 0 for a raw target
	if [ -z "$1" ]; then echo 0; return; fi
	awk '{print $14+$15}' /proc/$(field "$1" server_pid)/stat
}
common="--ioengine=io_uring --direct=1 --size=512M --numjobs=1 --group_reporting"
# Fill every device so reads hit written blocks, not holes.
for t in $targets; do
	fio --name=fill --filename=$(dev_of $t) $common --rw=write --bs=1M --iodepth=8 --output=/dev/null
done
job_args() {
	case $1 in
	randread)  echo "--rw=randread --bs=4k --iodepth=32" ;;
	randwrite) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
	seqread)   echo "--rw=read --bs=1M --iodepth=8" ;;
	seqwrite)  echo "--rw=write --bs=1M --iodepth=8" ;;
	esac
}
r=1
while [ $r -le $ROUNDS ]; do
	for job in randread randwrite seqread seqwrite; do
		for target in $targets; do
			m=$(minor_of $target)
			c0=$(cpu "$m")
			echo "@@JOB $r $job $target"
			fio --name=$job --filename=$(dev_of $target) $common $(job_args $job) \
				--time_based --runtime=$RUNTIME --ramp_time=1 --output-format=json; echo
			c1=$(cpu "$m")
			echo "@@CPU $((c1 - c0))"
		done
	done
	r=$((r + 1))
done
for t in $targets; do
	m=$(minor_of $t)
	[ -n "$m" ] || continue
	pid=$(field "$m" server_pid)
	echo "@@RSS $t $(awk '/^VmRSS/{r=$2} /^VmHWM/{h=$2} END{print r, h}' /proc/$pid/status)"
done
echo "@@DONE"
for m in 0 1 2; do dbdctl detach $m >/dev/null 2>&1 || true; done
