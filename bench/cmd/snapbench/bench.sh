#!/bin/sh
# Runs inside the VM (see main.go for the disks): snapshot, rewrite and
# incremental write costs against passthrough and the raw disk, snapshot
# device reads, update-img, setup-snapshot latency on a 1 TiB device and the
# server's memory under sustained random writes. Every measurement is
# printed between markers for the host to parse:
#   @@FIO <group> <job> <variant> <round>  ... fio JSON ...  @@END
#   @@VAL <name> <round> <value>
set -e
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
RSSTIME=${RSSTIME:-25}
FILEMB=${FILEMB:-256}
UPDMB=${UPDMB:-128}
SCATMB=${SCATMB:-16}
COWMB=${COWMB:-600}

RAW=/dev/vda     # raw virtio disk (baseline)
DEV=/dev/vdb     # identical disk, attached as minor 0
SCRATCH=/dev/vdc # COW files and the backup image
BIG=/dev/vdd     # 1 TiB sparse disk, attached as minor 1
FRONT=/dev/ublkb0
SNAP=/dev/datto0

mkdir -p /var/log /mnt/raw /mnt/front /scratch

now() { /usr/bin/date +%s%N; } # GNU date (busybox date has no %N)
us_since() { echo $((($(now) - $1) / 1000)); }
val() { echo "@@VAL $1 $2 $3"; }
info_field() { # minor field
	dbdctl info "$1" | sed -n "s/.*\"$2\": *\(-*[0-9][0-9]*\).*/\1/p" | head -n 1
}
# ticks <minor>: its server's CPU time so far (utime + stime, 10 ms ticks).
ticks() { awk '{print $14+$15}' /proc/$(info_field "$1" server_pid)/stat; }
# fio_run <group> <job> <variant> <round> fio-args...
# A write run (group W) through the front device also reports the
# server's CPU ticks during it (@@VAL cpu_<job>_<variant>).
fio_run() {
	tag="$1 $2 $3 $4"
	cpuname=
	[ $1 = W ] && [ $3 != raw ] && cpuname=cpu_$2_$3 && c0=$(ticks 0)
	cround=$4
	shift 4
	if ! fio --output-format=json --output=/tmp/fio.json "$@" >/tmp/fio.out 2>&1; then
		echo "fio failed ($tag):"
		cat /tmp/fio.out /tmp/fio.json
		exit 1
	fi
	[ -n "$cpuname" ] && val $cpuname $cround $(($(ticks 0) - c0))
	echo "@@FIO $tag"
	cat /tmp/fio.json
	echo
	echo "@@END"
}
quiet() { # run a command, show its output only when it fails
	if ! "$@" >/tmp/cmd.out 2>&1; then
		echo "failed: $*"
		cat /tmp/cmd.out
		exit 1
	fi
}

# The same ext4 on the raw disk and, through the front device, on its twin.
# No discard (it would punch the filled images) and no lazy init (it would
# write in the background during the runs).
mkfs="mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0"
quiet $mkfs $SCRATCH
mount -t ext4 $SCRATCH /scratch
quiet dbdctl attach $DEV 0
quiet $mkfs $RAW
quiet $mkfs $FRONT
mount -t ext4 $RAW /mnt/raw
mount -t ext4 $FRONT /mnt/front
for d in raw front; do
	quiet fio --name=prep --filename=/mnt/$d/bench.dat --size=${FILEMB}M --rw=write --bs=1M \
		--ioengine=io_uring --direct=1 --iodepth=8
done
sync
# The backup image update-img writes into: allocated, of the snapshot's size.
quiet dd if=/dev/zero of=/scratch/image.raw bs=1M count=$(($(blockdev --getsize64 $DEV) / 1048576)) conv=fsync
# Beside it, a file as allocated, for the raw write of as many bytes.
quiet dd if=/dev/zero of=/scratch/write.raw bs=1M count=$((UPDMB + 64)) conv=fsync
quiet dbdctl attach $BIG 1

wargs() {
	case $1 in
	randwrite) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
	seqwrite) echo "--rw=write --bs=1M --iodepth=8" ;;
	esac
}
rargs() {
	case $1 in
	randread) echo "--rw=randread --bs=4k --iodepth=32" ;;
	seqread) echo "--rw=read --bs=1M --iodepth=8" ;;
	esac
}
common="--ioengine=io_uring --direct=1 --numjobs=1 --group_reporting"
fileargs() { echo "--filename=/mnt/$1/bench.dat --size=${FILEMB}M $common"; }

n=0
# newcow sets C to a COW path not used before in this run.
newcow() { n=$((n + 1)); C=/scratch/cow$n; }
# snap_on <round>: a fresh snapshot of minor 0, with its setup latency.
snap_on() {
	newcow
	t0=$(now)
	quiet dbdctl setup-snapshot -f $COWMB $DEV $C 0
	val setup1g_us $1 $(us_since $t0)
}
snap_off() { quiet dbdctl destroy 0; }

# reads <phase>: the snapshot device against the raw disk, interleaved.
reads() {
	local rj ra
	val copied_blocks_$1 $r $(info_field 0 nr_changed_blocks)
	for rj in seqread randread; do
		ra=$(rargs $rj)
		fio_run R $rj snap-$1 $r --name=$rj --filename=$SNAP --readonly $common $ra \
			--time_based --runtime=$RUNTIME --ramp_time=1
		fio_run R $rj raw-$1 $r --name=$rj --filename=$RAW --readonly $common $ra \
			--time_based --runtime=$RUNTIME --ramp_time=1
		# The front device in passthrough is the same server's read path
		# without the snapshot; measured once, next to the pure phase.
		[ $1 = pure ] || continue
		fio_run R $rj front-$1 $r --name=$rj --filename=$FRONT --readonly $common $ra \
			--time_based --runtime=$RUNTIME --ramp_time=1
	done
}
DEVBLOCKS=$(($(blockdev --getsize64 $DEV) / 4096))
val dev_blocks 0 $DEVBLOCKS

r=1
while [ $r -le $ROUNDS ]; do
	echo "@@ROUND $r"
	# 1-3: writes to a file in ext4 on the front device, interleaved.
	for job in randwrite seqwrite; do
		a=$(wargs $job)
		fio_run W $job pass $r --name=$job $(fileargs front) $a --time_based --runtime=$RUNTIME
		fio_run W $job raw $r --name=$job $(fileargs raw) $a --time_based --runtime=$RUNTIME
		# First writes: a fresh snapshot, at most one pass over the file
		# (fio's random map visits each block once), so no block repeats.
		snap_on $r
		fio_run W $job first $r --name=$job $(fileargs front) $a --runtime=$RUNTIME
		# Copy whatever the first run did not reach, then the same job
		# again: every write now lands on an already-copied block.
		quiet fio --name=prime $(fileargs front) --rw=write --bs=1M --iodepth=8
		fio_run W $job rewrite $r --name=$job $(fileargs front) $a --time_based --runtime=$RUNTIME
		# 4 (mixed): the snapshot device with the whole file copied.
		if [ $job = seqwrite ]; then reads mixed; fi
		snap_off
		snap_on $r
		quiet dbdctl transition-to-incremental 0
		fio_run W $job incr $r --name=$job $(fileargs front) $a --time_based --runtime=$RUNTIME
		snap_off
		fio_run W $job pass $r --name=$job $(fileargs front) $a --time_based --runtime=$RUNTIME
	done

	# 4 (pure): the snapshot device with nothing copied yet.
	snap_on $r
	reads pure
	snap_off

	# 5: update-img after UPDMB MiB changed contiguously (one sequential
	# write) and after SCATMB MiB changed in scattered 4 KiB blocks.
	for kind in contig scatter; do
		newcow
		prev=$C
		quiet dbdctl setup-snapshot -f $COWMB $DEV $prev 0
		quiet dbdctl transition-to-incremental 0
		if [ $kind = contig ]; then
			quiet fio --name=change $(fileargs front) --rw=write --bs=1M --iodepth=8 --io_size=${UPDMB}M
		else
			quiet fio --name=change $(fileargs front) --rw=randwrite --bs=4k --iodepth=32 \
				--io_size=${SCATMB}M --randseed=$((r * 7))
		fi
		newcow
		quiet dbdctl transition-to-snapshot $C 0
		t0=$(now)
		dbdctl update-img $SNAP $prev /scratch/image.raw >/tmp/upd.out 2>&1 || { cat /tmp/upd.out; exit 1; }
		wall=$(us_since $t0)
		# "copying complete: B blocks changed, N bytes copied in S s (M MB/s)"
		set -- $(sed -n 's/.*complete: \([0-9]*\) blocks changed, \([0-9]*\) bytes copied in \([0-9.]*\) s.*/\1 \2 \3/p' /tmp/upd.out)
		[ $# = 3 ] || { echo "update-img summary not understood:"; cat /tmp/upd.out; exit 1; }
		val upd_${kind}_blocks $r $1
		val upd_${kind}_bytes $r $2
		val upd_${kind}_secs $r $3
		val upd_${kind}_wall_us $r $wall
		bytes=$2
		snap_off
		rm -f $prev
		# The same number of bytes read sequentially from the raw disk, by
		# fio (1M, QD8, O_DIRECT) and by dd (1M, one at a time, O_DIRECT).
		mib=$(((bytes + 1048575) / 1048576))
		fio_run U seqread raw-$kind $r --name=rawread --filename=$RAW --readonly $common \
			--rw=read --bs=1M --iodepth=8 --size=${mib}M --loops=3
		# ... and written to the image's disk as update-img writes them
		# (O_DIRECT into an allocated file, then fsync): a copy cannot
		# outrun either side.
		fio_run U seqwrite img-$kind $r --name=imgwrite --filename=/scratch/write.raw $common \
			--rw=write --bs=1M --iodepth=8 --size=${mib}M --end_fsync=1
		# ... and both at once, as a copy must: the raw disk read and the
		# image's disk written together (the read job never writes; fio's
		# --readonly would refuse the write job).
		fio_run U copy both-$kind $r $common --time_based --runtime=3 \
			--name=bothread --filename=$RAW --rw=read --bs=1M --iodepth=8 --size=${mib}M \
			--name=bothwrite --filename=/scratch/write.raw --rw=write --bs=1M --iodepth=8 --size=${mib}M
		t0=$(now)
		quiet dd if=$RAW of=/dev/null bs=1M count=$mib iflag=direct
		val dd_${kind}_us $r $(us_since $t0)
		val dd_${kind}_bytes $r $((mib * 1048576))
		# ... and through the page cache, as update-img reads the snapshot.
		sync
		echo 3 >/proc/sys/vm/drop_caches
		t0=$(now)
		quiet dd if=$RAW of=/dev/null bs=1M count=$mib
		val ddbuf_${kind}_us $r $(us_since $t0)
	done

	# 6: setup-snapshot on the 1 TiB sparse device (no filesystem on it).
	newcow
	t0=$(now)
	quiet dbdctl setup-snapshot -f 2100 $BIG $C 1
	val setup1t_us $r $(us_since $t0)
	t0=$(now)
	quiet dbdctl destroy 1
	val destroy1t_us $r $(us_since $t0)
	r=$((r + 1))
done

# 7: server memory under sustained 4k random writes over the whole 1 TiB
# device in snapshot mode (every write a first write; the index alone is
# 2 GiB). A fresh server for each cache limit, so VmHWM is its own. VmRSS
# is sampled every 5 s; AnonHugePages shows how much of it is transparent
# huge pages (the guest kernel has THP "always").
rss() { # prefix
	awk -v p=$1 '/^(VmRSS|VmHWM|RssAnon|RssFile|AnonHugePages):/ { sub(":", "", $1); print "@@VAL " p "_" $1 "_kb 0 " $2 }' \
		/proc/$pid/status /proc/$pid/smaps_rollup
}
for cache in 314572800 default; do
	quiet dbdctl detach 1
	quiet dbdctl attach $BIG 1
	pid=$(info_field 1 server_pid)
	copt="-c $cache"
	[ $cache = default ] && copt=
	newcow
	quiet dbdctl setup-snapshot $copt -f 4096 $BIG $C 1
	rss rss_${cache}_before
	(
		t=5
		while [ $t -le $RSSTIME ]; do
			sleep 5
			echo "@@VAL rss_${cache}_curve $t $(awk '/^VmRSS:/ { print $2 }' /proc/$pid/status)"
			t=$((t + 5))
		done
	) >/tmp/curve &
	sampler=$!
	fio_run M randwrite snap-$cache 0 --name=rss --filename=/dev/ublkb1 $common \
		--rw=randwrite --bs=4k --iodepth=32 --norandommap --randrepeat=0 --time_based --runtime=$RSSTIME
	rss rss_${cache}_after
	wait $sampler
	cat /tmp/curve
	val rss_${cache}_error 0 $(info_field 1 error)
	val rss_${cache}_changed 0 $(info_field 1 nr_changed_blocks)
	val rss_${cache}_cache_in_use 0 $(info_field 1 cache_in_use)
	quiet dbdctl destroy 1
done
quiet dbdctl detach 1
umount /mnt/front
quiet dbdctl detach 0
echo "@@DONE"
