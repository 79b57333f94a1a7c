#!/bin/sh
# Runs inside the VM: fio on the raw virtio disk (/dev/vda) and on the ublk
# front device of an identical disk (/dev/vdb attached as /dev/ublkb0),
# interleaved job by job and round by round, because TCG timing is noisy.
set -e
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
modprobe ublk_drv
dbdctl attach /dev/vdb 0 >/dev/null
PID=$(dbdctl info 0 | sed -n 's/.*"server_pid": *\([0-9]*\).*/\1/p')
cpu() { awk '{print $14+$15}' /proc/$PID/stat; }
common="--ioengine=io_uring --direct=1 --size=512M --numjobs=1 --group_reporting"
# Fill both devices so reads hit written blocks, not holes.
for dev in /dev/vda /dev/ublkb0; do
	fio --name=fill --filename=$dev $common --rw=write --bs=1M --iodepth=8 --output=/dev/null
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
		for target in raw front; do
			dev=/dev/vda; [ $target = front ] && dev=/dev/ublkb0
			c0=$(cpu)
			echo "@@JOB $r $job $target"
			fio --name=$job --filename=$dev $common $(job_args $job) \
				--time_based --runtime=$RUNTIME --ramp_time=1 --output-format=json; echo
			c1=$(cpu)
			echo "@@CPU $((c1 - c0))"
		done
	done
	r=$((r + 1))
done
echo "@@DONE"
dbdctl detach 0 >/dev/null
