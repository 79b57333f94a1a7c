package uapi

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"unsafe"
)

// iouField is one expected (offset, size) pair from the io_uring fact sheet
// (ublk-protocol.md §1), itself checked by compiling the kernel headers.
type iouField struct {
	name      string
	off, size uintptr
	gotOff    uintptr
	gotSize   uintptr
}

func iouCheck(t *testing.T, typ string, gotSize, wantSize uintptr, fields []iouField) {
	t.Helper()
	if gotSize != wantSize {
		t.Errorf("sizeof(%s) = %d, want %d", typ, gotSize, wantSize)
	}
	for _, f := range fields {
		if f.gotOff != f.off || f.gotSize != f.size {
			t.Errorf("%s.%s at %d size %d, want %d size %d", typ, f.name, f.gotOff, f.gotSize, f.off, f.size)
		}
	}
}

func TestIoUringLayout(t *testing.T) {
	var p IoUringParams
	iouCheck(t, "io_uring_params", unsafe.Sizeof(p), 120, []iouField{
		{"sq_entries", 0, 4, unsafe.Offsetof(p.SQEntries), unsafe.Sizeof(p.SQEntries)},
		{"cq_entries", 4, 4, unsafe.Offsetof(p.CQEntries), unsafe.Sizeof(p.CQEntries)},
		{"flags", 8, 4, unsafe.Offsetof(p.Flags), unsafe.Sizeof(p.Flags)},
		{"sq_thread_cpu", 12, 4, unsafe.Offsetof(p.SQThreadCPU), unsafe.Sizeof(p.SQThreadCPU)},
		{"sq_thread_idle", 16, 4, unsafe.Offsetof(p.SQThreadIdle), unsafe.Sizeof(p.SQThreadIdle)},
		{"features", 20, 4, unsafe.Offsetof(p.Features), unsafe.Sizeof(p.Features)},
		{"wq_fd", 24, 4, unsafe.Offsetof(p.WQFd), unsafe.Sizeof(p.WQFd)},
		{"resv", 28, 12, unsafe.Offsetof(p.Resv), unsafe.Sizeof(p.Resv)},
		{"sq_off", 40, 40, unsafe.Offsetof(p.SQOff), unsafe.Sizeof(p.SQOff)},
		{"cq_off", 80, 40, unsafe.Offsetof(p.CQOff), unsafe.Sizeof(p.CQOff)},
	})

	var so SQRingOffsets
	iouCheck(t, "io_sqring_offsets", unsafe.Sizeof(so), 40, []iouField{
		{"head", 0, 4, unsafe.Offsetof(so.Head), unsafe.Sizeof(so.Head)},
		{"tail", 4, 4, unsafe.Offsetof(so.Tail), unsafe.Sizeof(so.Tail)},
		{"ring_mask", 8, 4, unsafe.Offsetof(so.RingMask), unsafe.Sizeof(so.RingMask)},
		{"ring_entries", 12, 4, unsafe.Offsetof(so.RingEntries), unsafe.Sizeof(so.RingEntries)},
		{"flags", 16, 4, unsafe.Offsetof(so.Flags), unsafe.Sizeof(so.Flags)},
		{"dropped", 20, 4, unsafe.Offsetof(so.Dropped), unsafe.Sizeof(so.Dropped)},
		{"array", 24, 4, unsafe.Offsetof(so.Array), unsafe.Sizeof(so.Array)},
		{"resv1", 28, 4, unsafe.Offsetof(so.Resv1), unsafe.Sizeof(so.Resv1)},
		{"user_addr", 32, 8, unsafe.Offsetof(so.UserAddr), unsafe.Sizeof(so.UserAddr)},
	})

	var co CQRingOffsets
	iouCheck(t, "io_cqring_offsets", unsafe.Sizeof(co), 40, []iouField{
		{"head", 0, 4, unsafe.Offsetof(co.Head), unsafe.Sizeof(co.Head)},
		{"tail", 4, 4, unsafe.Offsetof(co.Tail), unsafe.Sizeof(co.Tail)},
		{"ring_mask", 8, 4, unsafe.Offsetof(co.RingMask), unsafe.Sizeof(co.RingMask)},
		{"ring_entries", 12, 4, unsafe.Offsetof(co.RingEntries), unsafe.Sizeof(co.RingEntries)},
		{"overflow", 16, 4, unsafe.Offsetof(co.Overflow), unsafe.Sizeof(co.Overflow)},
		{"cqes", 20, 4, unsafe.Offsetof(co.CQEs), unsafe.Sizeof(co.CQEs)},
		{"flags", 24, 4, unsafe.Offsetof(co.Flags), unsafe.Sizeof(co.Flags)},
		{"resv1", 28, 4, unsafe.Offsetof(co.Resv1), unsafe.Sizeof(co.Resv1)},
		{"user_addr", 32, 8, unsafe.Offsetof(co.UserAddr), unsafe.Sizeof(co.UserAddr)},
	})

	var s SQE
	iouCheck(t, "io_uring_sqe", unsafe.Sizeof(s), 64, []iouField{
		{"opcode", 0, 1, unsafe.Offsetof(s.Opcode), unsafe.Sizeof(s.Opcode)},
		{"flags", 1, 1, unsafe.Offsetof(s.Flags), unsafe.Sizeof(s.Flags)},
		{"ioprio", 2, 2, unsafe.Offsetof(s.Ioprio), unsafe.Sizeof(s.Ioprio)},
		{"fd", 4, 4, unsafe.Offsetof(s.Fd), unsafe.Sizeof(s.Fd)},
		{"off/addr2/cmd_op", 8, 8, unsafe.Offsetof(s.Off), unsafe.Sizeof(s.Off)},
		{"addr", 16, 8, unsafe.Offsetof(s.Addr), unsafe.Sizeof(s.Addr)},
		{"len", 24, 4, unsafe.Offsetof(s.Len), unsafe.Sizeof(s.Len)},
		{"rw_flags", 28, 4, unsafe.Offsetof(s.OpFlags), unsafe.Sizeof(s.OpFlags)},
		{"user_data", 32, 8, unsafe.Offsetof(s.UserData), unsafe.Sizeof(s.UserData)},
		{"buf_index", 40, 2, unsafe.Offsetof(s.BufIndex), unsafe.Sizeof(s.BufIndex)},
		{"personality", 42, 2, unsafe.Offsetof(s.Personality), unsafe.Sizeof(s.Personality)},
		{"splice_fd_in", 44, 4, unsafe.Offsetof(s.SpliceFdIn), unsafe.Sizeof(s.SpliceFdIn)},
		{"addr3/cmd", 48, 8, unsafe.Offsetof(s.Addr3), unsafe.Sizeof(s.Addr3)},
		{"__pad2", 56, 8, unsafe.Offsetof(s.Pad2), unsafe.Sizeof(s.Pad2)},
	})
	if unsafe.Offsetof(s.Addr3) != SQECmdOffset {
		t.Errorf("SQECmdOffset = %d, want offset of addr3 %d", SQECmdOffset, unsafe.Offsetof(s.Addr3))
	}

	var c CQE
	iouCheck(t, "io_uring_cqe", unsafe.Sizeof(c), 16, []iouField{
		{"user_data", 0, 8, unsafe.Offsetof(c.UserData), unsafe.Sizeof(c.UserData)},
		{"res", 8, 4, unsafe.Offsetof(c.Res), unsafe.Sizeof(c.Res)},
		{"flags", 12, 4, unsafe.Offsetof(c.Flags), unsafe.Sizeof(c.Flags)},
	})

	var g GetEventsArg
	iouCheck(t, "io_uring_getevents_arg", unsafe.Sizeof(g), 24, []iouField{
		{"sigmask", 0, 8, unsafe.Offsetof(g.Sigmask), unsafe.Sizeof(g.Sigmask)},
		{"sigmask_sz", 8, 4, unsafe.Offsetof(g.SigmaskSz), unsafe.Sizeof(g.SigmaskSz)},
		{"pad", 12, 4, unsafe.Offsetof(g.MinWaitUsec), unsafe.Sizeof(g.MinWaitUsec)},
		{"ts", 16, 8, unsafe.Offsetof(g.Ts), unsafe.Sizeof(g.Ts)},
	})

	var ts Timespec
	iouCheck(t, "__kernel_timespec", unsafe.Sizeof(ts), 16, []iouField{
		{"tv_sec", 0, 8, unsafe.Offsetof(ts.Sec), unsafe.Sizeof(ts.Sec)},
		{"tv_nsec", 8, 8, unsafe.Offsetof(ts.Nsec), unsafe.Sizeof(ts.Nsec)},
	})

	var ph ProbeHeader
	iouCheck(t, "io_uring_probe", unsafe.Sizeof(ph), 16, []iouField{
		{"last_op", 0, 1, unsafe.Offsetof(ph.LastOp), unsafe.Sizeof(ph.LastOp)},
		{"ops_len", 1, 1, unsafe.Offsetof(ph.OpsLen), unsafe.Sizeof(ph.OpsLen)},
		{"resv", 2, 2, unsafe.Offsetof(ph.Resv), unsafe.Sizeof(ph.Resv)},
		{"resv2", 4, 12, unsafe.Offsetof(ph.Resv2), unsafe.Sizeof(ph.Resv2)},
	})

	var rr RsrcRegister
	iouCheck(t, "io_uring_rsrc_register", unsafe.Sizeof(rr), 32, []iouField{
		{"nr", 0, 4, unsafe.Offsetof(rr.Nr), unsafe.Sizeof(rr.Nr)},
		{"flags", 4, 4, unsafe.Offsetof(rr.Flags), unsafe.Sizeof(rr.Flags)},
		{"resv2", 8, 8, unsafe.Offsetof(rr.Resv2), unsafe.Sizeof(rr.Resv2)},
		{"data", 16, 8, unsafe.Offsetof(rr.Data), unsafe.Sizeof(rr.Data)},
		{"tags", 24, 8, unsafe.Offsetof(rr.Tags), unsafe.Sizeof(rr.Tags)},
	})

	var po ProbeOp
	iouCheck(t, "io_uring_probe_op", unsafe.Sizeof(po), 8, []iouField{
		{"op", 0, 1, unsafe.Offsetof(po.Op), unsafe.Sizeof(po.Op)},
		{"resv", 1, 1, unsafe.Offsetof(po.Resv), unsafe.Sizeof(po.Resv)},
		{"flags", 2, 2, unsafe.Offsetof(po.Flags), unsafe.Sizeof(po.Flags)},
		{"resv2", 4, 4, unsafe.Offsetof(po.Resv2), unsafe.Sizeof(po.Resv2)},
	})
}

func TestIoUringConstants(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"MaxSQEntries", MaxSQEntries, 32768},
		{"MaxCQEntries", MaxCQEntries, 65536},

		{"IORING_SETUP_IOPOLL", SetupIOPoll, 1 << 0},
		{"IORING_SETUP_SQPOLL", SetupSQPoll, 1 << 1},
		{"IORING_SETUP_SQ_AFF", SetupSQAff, 1 << 2},
		{"IORING_SETUP_CQSIZE", SetupCQSize, 1 << 3},
		{"IORING_SETUP_CLAMP", SetupClamp, 1 << 4},
		{"IORING_SETUP_ATTACH_WQ", SetupAttachWQ, 1 << 5},
		{"IORING_SETUP_R_DISABLED", SetupRDisabled, 1 << 6},
		{"IORING_SETUP_SUBMIT_ALL", SetupSubmitAll, 1 << 7},
		{"IORING_SETUP_COOP_TASKRUN", SetupCoopTaskrun, 1 << 8},
		{"IORING_SETUP_TASKRUN_FLAG", SetupTaskrunFlag, 1 << 9},
		{"IORING_SETUP_SQE128", SetupSQE128, 1 << 10},
		{"IORING_SETUP_CQE32", SetupCQE32, 1 << 11},
		{"IORING_SETUP_SINGLE_ISSUER", SetupSingleIssuer, 1 << 12},
		{"IORING_SETUP_DEFER_TASKRUN", SetupDeferTaskrun, 1 << 13},
		{"IORING_SETUP_NO_MMAP", SetupNoMmap, 1 << 14},
		{"IORING_SETUP_REGISTERED_FD_ONLY", SetupRegisteredFdOnly, 1 << 15},
		{"IORING_SETUP_NO_SQARRAY", SetupNoSQArray, 1 << 16},

		{"IORING_FEAT_SINGLE_MMAP", RingFeatSingleMmap, 1 << 0},
		{"IORING_FEAT_NODROP", RingFeatNoDrop, 1 << 1},
		{"IORING_FEAT_SUBMIT_STABLE", RingFeatSubmitStable, 1 << 2},
		{"IORING_FEAT_RW_CUR_POS", RingFeatRWCurPos, 1 << 3},
		{"IORING_FEAT_CUR_PERSONALITY", RingFeatCurPersonality, 1 << 4},
		{"IORING_FEAT_FAST_POLL", RingFeatFastPoll, 1 << 5},
		{"IORING_FEAT_POLL_32BITS", RingFeatPoll32Bits, 1 << 6},
		{"IORING_FEAT_SQPOLL_NONFIXED", RingFeatSQPollNonfixed, 1 << 7},
		{"IORING_FEAT_EXT_ARG", RingFeatExtArg, 1 << 8},
		{"IORING_FEAT_NATIVE_WORKERS", RingFeatNativeWorkers, 1 << 9},
		{"IORING_FEAT_RSRC_TAGS", RingFeatRsrcTags, 1 << 10},
		{"IORING_FEAT_CQE_SKIP", RingFeatCQESkip, 1 << 11},
		{"IORING_FEAT_LINKED_FILE", RingFeatLinkedFile, 1 << 12},

		{"IORING_ENTER_GETEVENTS", EnterGetEvents, 1},
		{"IORING_ENTER_SQ_WAKEUP", EnterSQWakeup, 2},
		{"IORING_ENTER_SQ_WAIT", EnterSQWait, 4},
		{"IORING_ENTER_EXT_ARG", EnterExtArg, 8},
		{"IORING_ENTER_REGISTERED_RING", EnterRegisteredRing, 16},

		{"IORING_SQ_NEED_WAKEUP", SQNeedWakeup, 1},
		{"IORING_SQ_CQ_OVERFLOW", SQCQOverflow, 2},
		{"IORING_SQ_TASKRUN", SQTaskrun, 4},

		{"IORING_CQE_F_BUFFER", CQEFBuffer, 1},
		{"IORING_CQE_F_MORE", CQEFMore, 2},
		{"IORING_CQE_F_SOCK_NONEMPTY", CQEFSockNonempty, 4},
		{"IORING_CQE_F_NOTIF", CQEFNotif, 8},

		{"IORING_OFF_SQ_RING", OffSQRing, 0},
		{"IORING_OFF_CQ_RING", OffCQRing, 0x8000000},
		{"IORING_OFF_SQES", OffSQEs, 0x10000000},

		{"IORING_OP_NOP", OpNop, 0},
		{"IORING_OP_READV", OpReadv, 1},
		{"IORING_OP_WRITEV", OpWritev, 2},
		{"IORING_OP_FSYNC", OpFsync, 3},
		{"IORING_OP_READ_FIXED", OpReadFixed, 4},
		{"IORING_OP_WRITE_FIXED", OpWriteFixed, 5},
		{"IORING_OP_POLL_ADD", OpPollAdd, 6},
		{"IORING_OP_POLL_REMOVE", OpPollRemove, 7},
		{"IORING_OP_SYNC_FILE_RANGE", OpSyncFileRange, 8},
		{"IORING_OP_TIMEOUT", OpTimeout, 11},
		{"IORING_OP_TIMEOUT_REMOVE", OpTimeoutRemove, 12},
		{"IORING_OP_ASYNC_CANCEL", OpAsyncCancel, 14},
		{"IORING_OP_LINK_TIMEOUT", OpLinkTimeout, 15},
		{"IORING_OP_FALLOCATE", OpFallocate, 17},
		{"IORING_OP_READ", OpRead, 22},
		{"IORING_OP_WRITE", OpWrite, 23},
		{"IORING_OP_MSG_RING", OpMsgRing, 40},
		{"IORING_OP_URING_CMD", OpURingCmd, 46},

		{"IOSQE_FIXED_FILE", SQEFixedFile, 1},
		{"IOSQE_IO_DRAIN", SQEIODrain, 2},
		{"IOSQE_IO_LINK", SQEIOLink, 4},
		{"IOSQE_IO_HARDLINK", SQEIOHardlink, 8},
		{"IOSQE_ASYNC", SQEAsync, 16},
		{"IOSQE_BUFFER_SELECT", SQEBufferSelect, 32},
		{"IOSQE_CQE_SKIP_SUCCESS", SQECQESkipSuccess, 64},

		{"IORING_FSYNC_DATASYNC", FsyncDatasync, 1},
		{"IORING_URING_CMD_FIXED", URingCmdFixed, 1},
		{"IORING_TIMEOUT_ABS", TimeoutAbs, 1},

		{"RWF_HIPRI", RWFHipri, 1},
		{"RWF_DSYNC", RWFDsync, 2},
		{"RWF_SYNC", RWFSync, 4},
		{"RWF_NOWAIT", RWFNowait, 8},

		{"FALLOC_FL_KEEP_SIZE", FallocKeepSize, 0x01},
		{"FALLOC_FL_PUNCH_HOLE", FallocPunchHole, 0x02},
		{"FALLOC_FL_ZERO_RANGE", FallocZeroRange, 0x10},

		{"IORING_REGISTER_BUFFERS", uint64(RegisterBuffers), 0},
		{"IORING_UNREGISTER_BUFFERS", uint64(UnregisterBuffers), 1},
		{"IORING_REGISTER_FILES", uint64(RegisterFiles), 2},
		{"IORING_UNREGISTER_FILES", uint64(UnregisterFiles), 3},
		{"IORING_REGISTER_EVENTFD", uint64(RegisterEventFd), 4},
		{"IORING_UNREGISTER_EVENTFD", uint64(UnregisterEventFd), 5},
		{"IORING_REGISTER_FILES_UPDATE", uint64(RegisterFilesUpdate), 6},
		{"IORING_REGISTER_PROBE", uint64(RegisterProbe), 8},
		{"IORING_REGISTER_BUFFERS2", uint64(RegisterBuffers2), 15},
		{"IORING_RSRC_REGISTER_SPARSE", RsrcRegisterSparse, 1},

		{"IO_URING_OP_SUPPORTED", ProbeOpSupported, 1},

		{"SizeofSQE", SizeofSQE, 64},
		{"SizeofSQE128", SizeofSQE128, 128},
		{"SizeofCQE", SizeofCQE, 16},
		{"SQECmdOffset", SQECmdOffset, 48},
		{"SQECmdSize", SQECmdSize, 16},
		{"SQECmdSize128", SQECmdSize128, 80},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

// TestIoUringConstantTypes pins the fields the untyped constants must fit.
func TestIoUringConstantTypes(t *testing.T) {
	var s SQE
	s.Opcode = OpURingCmd
	s.Flags = SQEFixedFile | SQEIOLink | SQECQESkipSuccess
	s.OpFlags = RWFDsync | FsyncDatasync | URingCmdFixed
	var p IoUringParams
	p.Flags = SetupSQE128 | SetupCQSize | SetupSingleIssuer | SetupDeferTaskrun | SetupNoSQArray
	if s.Opcode != 46 || p.Flags&SetupSQE128 == 0 {
		t.Fatal("constant round trip")
	}
}

// TestIoUringHeaderCrossCheck compiles a tiny C program against the
// installed linux/io_uring.h (when gcc and the header exist) and compares
// its view of the ABI with this package's. Nothing is copied from the
// header; it is only consulted on the test machine.
func TestIoUringHeaderCrossCheck(t *testing.T) {
	if testing.Short() {
		t.Skip("short mode")
	}
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		t.Skip("gcc not installed")
	}
	if _, err := os.Stat("/usr/include/linux/io_uring.h"); err != nil {
		t.Skip("linux/io_uring.h not installed")
	}
	// name -> Go value. Names that are C expressions are printed as is.
	want := map[string]uint64{
		"sizeof(struct io_uring_params)":                 uint64(unsafe.Sizeof(IoUringParams{})),
		"sizeof(struct io_sqring_offsets)":               uint64(unsafe.Sizeof(SQRingOffsets{})),
		"sizeof(struct io_cqring_offsets)":               uint64(unsafe.Sizeof(CQRingOffsets{})),
		"sizeof(struct io_uring_sqe)":                    uint64(unsafe.Sizeof(SQE{})),
		"sizeof(struct io_uring_cqe)":                    uint64(unsafe.Sizeof(CQE{})),
		"sizeof(struct io_uring_getevents_arg)":          uint64(unsafe.Sizeof(GetEventsArg{})),
		"sizeof(struct __kernel_timespec)":               uint64(unsafe.Sizeof(Timespec{})),
		"sizeof(struct io_uring_probe)":                  uint64(unsafe.Sizeof(ProbeHeader{})),
		"sizeof(struct io_uring_probe_op)":               uint64(unsafe.Sizeof(ProbeOp{})),
		"sizeof(struct io_uring_rsrc_register)":          uint64(unsafe.Sizeof(RsrcRegister{})),
		"IORING_REGISTER_BUFFERS2":                       uint64(RegisterBuffers2),
		"IORING_RSRC_REGISTER_SPARSE":                    RsrcRegisterSparse,
		"offsetof(struct io_uring_params, features)":     uint64(unsafe.Offsetof(IoUringParams{}.Features)),
		"offsetof(struct io_uring_params, sq_off)":       uint64(unsafe.Offsetof(IoUringParams{}.SQOff)),
		"offsetof(struct io_uring_params, cq_off)":       uint64(unsafe.Offsetof(IoUringParams{}.CQOff)),
		"offsetof(struct io_sqring_offsets, array)":      uint64(unsafe.Offsetof(SQRingOffsets{}.Array)),
		"offsetof(struct io_cqring_offsets, cqes)":       uint64(unsafe.Offsetof(CQRingOffsets{}.CQEs)),
		"offsetof(struct io_cqring_offsets, flags)":      uint64(unsafe.Offsetof(CQRingOffsets{}.Flags)),
		"offsetof(struct io_uring_sqe, off)":             uint64(unsafe.Offsetof(SQE{}.Off)),
		"offsetof(struct io_uring_sqe, addr)":            uint64(unsafe.Offsetof(SQE{}.Addr)),
		"offsetof(struct io_uring_sqe, len)":             uint64(unsafe.Offsetof(SQE{}.Len)),
		"offsetof(struct io_uring_sqe, rw_flags)":        uint64(unsafe.Offsetof(SQE{}.OpFlags)),
		"offsetof(struct io_uring_sqe, uring_cmd_flags)": uint64(unsafe.Offsetof(SQE{}.OpFlags)),
		"offsetof(struct io_uring_sqe, user_data)":       uint64(unsafe.Offsetof(SQE{}.UserData)),
		"offsetof(struct io_uring_sqe, buf_index)":       uint64(unsafe.Offsetof(SQE{}.BufIndex)),
		"offsetof(struct io_uring_sqe, personality)":     uint64(unsafe.Offsetof(SQE{}.Personality)),
		"offsetof(struct io_uring_sqe, file_index)":      uint64(unsafe.Offsetof(SQE{}.SpliceFdIn)),
		"offsetof(struct io_uring_sqe, addr3)":           uint64(unsafe.Offsetof(SQE{}.Addr3)),
		"offsetof(struct io_uring_sqe, cmd)":             SQECmdOffset,
		"offsetof(struct io_uring_cqe, res)":             uint64(unsafe.Offsetof(CQE{}.Res)),
		"offsetof(struct io_uring_getevents_arg, ts)":    uint64(unsafe.Offsetof(GetEventsArg{}.Ts)),
		"offsetof(struct io_uring_probe_op, flags)":      uint64(unsafe.Offsetof(ProbeOp{}.Flags)),
		"IORING_SETUP_IOPOLL":                            SetupIOPoll,
		"IORING_SETUP_SQPOLL":                            SetupSQPoll,
		"IORING_SETUP_CQSIZE":                            SetupCQSize,
		"IORING_SETUP_CLAMP":                             SetupClamp,
		"IORING_SETUP_SUBMIT_ALL":                        SetupSubmitAll,
		"IORING_SETUP_COOP_TASKRUN":                      SetupCoopTaskrun,
		"IORING_SETUP_TASKRUN_FLAG":                      SetupTaskrunFlag,
		"IORING_SETUP_SQE128":                            SetupSQE128,
		"IORING_SETUP_CQE32":                             SetupCQE32,
		"IORING_SETUP_SINGLE_ISSUER":                     SetupSingleIssuer,
		"IORING_SETUP_DEFER_TASKRUN":                     SetupDeferTaskrun,
		"IORING_SETUP_NO_MMAP":                           SetupNoMmap,
		"IORING_SETUP_REGISTERED_FD_ONLY":                SetupRegisteredFdOnly,
		"IORING_SETUP_NO_SQARRAY":                        SetupNoSQArray,
		"IORING_FEAT_SINGLE_MMAP":                        RingFeatSingleMmap,
		"IORING_FEAT_NODROP":                             RingFeatNoDrop,
		"IORING_FEAT_EXT_ARG":                            RingFeatExtArg,
		"IORING_FEAT_CQE_SKIP":                           RingFeatCQESkip,
		"IORING_FEAT_LINKED_FILE":                        RingFeatLinkedFile,
		"IORING_ENTER_GETEVENTS":                         EnterGetEvents,
		"IORING_ENTER_EXT_ARG":                           EnterExtArg,
		"IORING_ENTER_REGISTERED_RING":                   EnterRegisteredRing,
		"IORING_SQ_NEED_WAKEUP":                          SQNeedWakeup,
		"IORING_SQ_CQ_OVERFLOW":                          SQCQOverflow,
		"IORING_SQ_TASKRUN":                              SQTaskrun,
		"IORING_CQE_F_BUFFER":                            CQEFBuffer,
		"IORING_CQE_F_MORE":                              CQEFMore,
		"IORING_OFF_SQ_RING":                             OffSQRing,
		"IORING_OFF_CQ_RING":                             OffCQRing,
		"IORING_OFF_SQES":                                OffSQEs,
		"IORING_OP_NOP":                                  OpNop,
		"IORING_OP_READV":                                OpReadv,
		"IORING_OP_WRITEV":                               OpWritev,
		"IORING_OP_FSYNC":                                OpFsync,
		"IORING_OP_READ_FIXED":                           OpReadFixed,
		"IORING_OP_WRITE_FIXED":                          OpWriteFixed,
		"IORING_OP_POLL_ADD":                             OpPollAdd,
		"IORING_OP_POLL_REMOVE":                          OpPollRemove,
		"IORING_OP_SYNC_FILE_RANGE":                      OpSyncFileRange,
		"IORING_OP_TIMEOUT":                              OpTimeout,
		"IORING_OP_TIMEOUT_REMOVE":                       OpTimeoutRemove,
		"IORING_OP_ASYNC_CANCEL":                         OpAsyncCancel,
		"IORING_OP_LINK_TIMEOUT":                         OpLinkTimeout,
		"IORING_OP_FALLOCATE":                            OpFallocate,
		"IORING_OP_READ":                                 OpRead,
		"IORING_OP_WRITE":                                OpWrite,
		"IORING_OP_MSG_RING":                             OpMsgRing,
		"IORING_OP_URING_CMD":                            OpURingCmd,
		"IOSQE_FIXED_FILE":                               SQEFixedFile,
		"IOSQE_IO_DRAIN":                                 SQEIODrain,
		"IOSQE_IO_LINK":                                  SQEIOLink,
		"IOSQE_IO_HARDLINK":                              SQEIOHardlink,
		"IOSQE_ASYNC":                                    SQEAsync,
		"IOSQE_BUFFER_SELECT":                            SQEBufferSelect,
		"IOSQE_CQE_SKIP_SUCCESS":                         SQECQESkipSuccess,
		"IORING_FSYNC_DATASYNC":                          FsyncDatasync,
		"IORING_URING_CMD_FIXED":                         URingCmdFixed,
		"IORING_TIMEOUT_ABS":                             TimeoutAbs,
		"IORING_REGISTER_BUFFERS":                        uint64(RegisterBuffers),
		"IORING_UNREGISTER_BUFFERS":                      uint64(UnregisterBuffers),
		"IORING_REGISTER_FILES":                          uint64(RegisterFiles),
		"IORING_UNREGISTER_FILES":                        uint64(UnregisterFiles),
		"IORING_REGISTER_EVENTFD":                        uint64(RegisterEventFd),
		"IORING_UNREGISTER_EVENTFD":                      uint64(UnregisterEventFd),
		"IORING_REGISTER_FILES_UPDATE":                   uint64(RegisterFilesUpdate),
		"IORING_REGISTER_PROBE":                          uint64(RegisterProbe),
		"IO_URING_OP_SUPPORTED":                          ProbeOpSupported,
		"RWF_HIPRI":                                      RWFHipri,
		"RWF_DSYNC":                                      RWFDsync,
		"RWF_SYNC":                                       RWFSync,
		"RWF_NOWAIT":                                     RWFNowait,
		"FALLOC_FL_KEEP_SIZE":                            FallocKeepSize,
		"FALLOC_FL_PUNCH_HOLE":                           FallocPunchHole,
		"FALLOC_FL_ZERO_RANGE":                           FallocZeroRange,
	}
	// Macros newer than the installed header are skipped (#ifdef); enum
	// members and expressions are always printed.
	var src strings.Builder
	src.WriteString("#include <stdio.h>\n#include <stddef.h>\n#include <linux/fs.h>\n#include <linux/falloc.h>\n#include <linux/io_uring.h>\nint main(void) {\n")
	names := make([]string, 0, len(want))
	for name := range want {
		names = append(names, name)
	}
	sort.Strings(names)
	isEnum := func(n string) bool {
		return strings.HasPrefix(n, "IORING_OP_") || strings.HasPrefix(n, "IORING_REGISTER_") ||
			strings.HasPrefix(n, "IORING_UNREGISTER_") || strings.HasPrefix(n, "IOSQE_")
	}
	for _, name := range names {
		line := fmt.Sprintf("printf(\"%%s=%%llu\\n\", %q, (unsigned long long)(%s));\n", name, name)
		if strings.HasPrefix(name, "sizeof") || strings.HasPrefix(name, "offsetof") || isEnum(name) {
			src.WriteString(line)
		} else {
			fmt.Fprintf(&src, "#ifdef %s\n%s#endif\n", name, line)
		}
	}
	src.WriteString("return 0;\n}\n")
	dir := t.TempDir()
	cfile, bin := filepath.Join(dir, "probe.c"), filepath.Join(dir, "probe")
	if err := os.WriteFile(cfile, []byte(src.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(gcc, "-o", bin, cfile).CombinedOutput(); err != nil {
		t.Skipf("cannot compile the header probe (old header?): %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		name, val, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("bad probe line %q", line)
		}
		got, err := strconv.ParseUint(val, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		if got != want[name] {
			t.Errorf("%s: header %#x, uapi %#x", name, got, want[name])
		}
		checked++
	}
	t.Logf("%d of %d values cross-checked against the installed header", checked, len(want))
}
