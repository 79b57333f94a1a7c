package uapi

import "structs"

// This file mirrors the parts of include/uapi/linux/io_uring.h (plus a few
// flags from linux/fs.h and linux/falloc.h) that a block server uses. Field
// comments give the kernel name; unions list every member that matters here.
//
// Constants are untyped so that they drop straight into the uint8/uint16/
// uint32 SQE and params fields they belong to, and into uring.Options.Flags.

// Syscall limits (io_uring_setup).
const (
	MaxSQEntries = 32768 // IORING_MAX_ENTRIES
	MaxCQEntries = 65536 // IORING_MAX_CQ_ENTRIES
)

// Setup flags: io_uring_params.flags (IORING_SETUP_*).
const (
	SetupIOPoll           = 1 << 0  // IORING_SETUP_IOPOLL: busy-poll completions (O_DIRECT only)
	SetupSQPoll           = 1 << 1  // IORING_SETUP_SQPOLL: kernel thread submits
	SetupSQAff            = 1 << 2  // IORING_SETUP_SQ_AFF: sq_thread_cpu is valid
	SetupCQSize           = 1 << 3  // IORING_SETUP_CQSIZE: cq_entries is an input
	SetupClamp            = 1 << 4  // IORING_SETUP_CLAMP: clamp entries to the maximum
	SetupAttachWQ         = 1 << 5  // IORING_SETUP_ATTACH_WQ: share wq_fd's io-wq
	SetupRDisabled        = 1 << 6  // IORING_SETUP_R_DISABLED: start disabled
	SetupSubmitAll        = 1 << 7  // IORING_SETUP_SUBMIT_ALL: keep submitting after a bad SQE (5.18)
	SetupCoopTaskrun      = 1 << 8  // IORING_SETUP_COOP_TASKRUN: no IPI for task work (5.19)
	SetupTaskrunFlag      = 1 << 9  // IORING_SETUP_TASKRUN_FLAG: set SQTaskrun when task work is pending (5.19)
	SetupSQE128           = 1 << 10 // IORING_SETUP_SQE128: 128-byte SQEs (5.19)
	SetupCQE32            = 1 << 11 // IORING_SETUP_CQE32: 32-byte CQEs (5.19)
	SetupSingleIssuer     = 1 << 12 // IORING_SETUP_SINGLE_ISSUER: one submitting task (6.0)
	SetupDeferTaskrun     = 1 << 13 // IORING_SETUP_DEFER_TASKRUN: task work only in enter(GETEVENTS) (6.1)
	SetupNoMmap           = 1 << 14 // IORING_SETUP_NO_MMAP: rings in user memory (6.5)
	SetupRegisteredFdOnly = 1 << 15 // IORING_SETUP_REGISTERED_FD_ONLY (6.5)
	SetupNoSQArray        = 1 << 16 // IORING_SETUP_NO_SQARRAY: no SQ index array (6.6)
)

// Feature flags: io_uring_params.features (IORING_FEAT_*). The names carry a
// Ring prefix to keep them apart from ublk's UBLK_F_* features.
const (
	RingFeatSingleMmap     = 1 << 0  // IORING_FEAT_SINGLE_MMAP: SQ and CQ rings share one mapping
	RingFeatNoDrop         = 1 << 1  // IORING_FEAT_NODROP: CQEs overflow to a list instead of being dropped
	RingFeatSubmitStable   = 1 << 2  // IORING_FEAT_SUBMIT_STABLE
	RingFeatRWCurPos       = 1 << 3  // IORING_FEAT_RW_CUR_POS
	RingFeatCurPersonality = 1 << 4  // IORING_FEAT_CUR_PERSONALITY
	RingFeatFastPoll       = 1 << 5  // IORING_FEAT_FAST_POLL
	RingFeatPoll32Bits     = 1 << 6  // IORING_FEAT_POLL_32BITS
	RingFeatSQPollNonfixed = 1 << 7  // IORING_FEAT_SQPOLL_NONFIXED
	RingFeatExtArg         = 1 << 8  // IORING_FEAT_EXT_ARG: io_uring_enter takes GetEventsArg (5.11)
	RingFeatNativeWorkers  = 1 << 9  // IORING_FEAT_NATIVE_WORKERS
	RingFeatRsrcTags       = 1 << 10 // IORING_FEAT_RSRC_TAGS
	RingFeatCQESkip        = 1 << 11 // IORING_FEAT_CQE_SKIP
	RingFeatLinkedFile     = 1 << 12 // IORING_FEAT_LINKED_FILE
)

// io_uring_enter flags (IORING_ENTER_*).
const (
	EnterGetEvents      = 1 << 0 // IORING_ENTER_GETEVENTS: wait for min_complete CQEs; runs task work
	EnterSQWakeup       = 1 << 1 // IORING_ENTER_SQ_WAKEUP (SQPOLL)
	EnterSQWait         = 1 << 2 // IORING_ENTER_SQ_WAIT (SQPOLL)
	EnterExtArg         = 1 << 3 // IORING_ENTER_EXT_ARG: argp is a GetEventsArg
	EnterRegisteredRing = 1 << 4 // IORING_ENTER_REGISTERED_RING
)

// SQ ring flags, read atomically from the word at SQRingOffsets.Flags
// (IORING_SQ_*).
const (
	SQNeedWakeup = 1 << 0 // IORING_SQ_NEED_WAKEUP (SQPOLL)
	SQCQOverflow = 1 << 1 // IORING_SQ_CQ_OVERFLOW: CQEs wait in the overflow list; enter(GETEVENTS) flushes
	SQTaskrun    = 1 << 2 // IORING_SQ_TASKRUN: task work pending (with SetupTaskrunFlag)
)

// CQE flags: CQE.Flags (IORING_CQE_F_*).
const (
	CQEFBuffer       = 1 << 0 // IORING_CQE_F_BUFFER: upper 16 bits are a buffer id
	CQEFMore         = 1 << 1 // IORING_CQE_F_MORE: the SQE will post more CQEs
	CQEFSockNonempty = 1 << 2 // IORING_CQE_F_SOCK_NONEMPTY
	CQEFNotif        = 1 << 3 // IORING_CQE_F_NOTIF
)

// mmap offsets on the ring fd (IORING_OFF_*).
const (
	OffSQRing = 0x00000000 // IORING_OFF_SQ_RING: sq_off.array + sq_entries*4 bytes
	OffCQRing = 0x08000000 // IORING_OFF_CQ_RING: cq_off.cqes + cq_entries*16 bytes
	OffSQEs   = 0x10000000 // IORING_OFF_SQES: sq_entries*64 (or *128 with SetupSQE128) bytes
)

// Opcodes: SQE.Opcode (enum io_uring_op).
const (
	OpNop           = 0  // IORING_OP_NOP
	OpReadv         = 1  // IORING_OP_READV: addr=iovec*, len=nr_vecs, off
	OpWritev        = 2  // IORING_OP_WRITEV
	OpFsync         = 3  // IORING_OP_FSYNC: fsync_flags, off/len range (len 0 = whole file)
	OpReadFixed     = 4  // IORING_OP_READ_FIXED: like OpRead plus buf_index
	OpWriteFixed    = 5  // IORING_OP_WRITE_FIXED
	OpPollAdd       = 6  // IORING_OP_POLL_ADD: poll32_events
	OpPollRemove    = 7  // IORING_OP_POLL_REMOVE
	OpSyncFileRange = 8  // IORING_OP_SYNC_FILE_RANGE
	OpTimeout       = 11 // IORING_OP_TIMEOUT: addr=__kernel_timespec*, len=1, off=count
	OpTimeoutRemove = 12 // IORING_OP_TIMEOUT_REMOVE
	OpAsyncCancel   = 14 // IORING_OP_ASYNC_CANCEL: addr=user_data to cancel
	OpLinkTimeout   = 15 // IORING_OP_LINK_TIMEOUT
	OpFallocate     = 17 // IORING_OP_FALLOCATE: off=offset, addr=LENGTH, len=MODE
	OpRead          = 22 // IORING_OP_READ: addr=buf, len=bytes, off, rw_flags
	OpWrite         = 23 // IORING_OP_WRITE
	OpMsgRing       = 40 // IORING_OP_MSG_RING: post a CQE into another ring
	OpURingCmd      = 46 // IORING_OP_URING_CMD: cmd_op at byte 8, payload at byte 48
)

// SQE flags: SQE.Flags (IOSQE_*).
const (
	SQEFixedFile      = 1 << 0 // IOSQE_FIXED_FILE: fd is an index into the registered files
	SQEIODrain        = 1 << 1 // IOSQE_IO_DRAIN
	SQEIOLink         = 1 << 2 // IOSQE_IO_LINK
	SQEIOHardlink     = 1 << 3 // IOSQE_IO_HARDLINK
	SQEAsync          = 1 << 4 // IOSQE_ASYNC: never on ublk commands
	SQEBufferSelect   = 1 << 5 // IOSQE_BUFFER_SELECT
	SQECQESkipSuccess = 1 << 6 // IOSQE_CQE_SKIP_SUCCESS
)

// Per-opcode flags that go into SQE.OpFlags.
const (
	FsyncDatasync = 1 << 0 // IORING_FSYNC_DATASYNC (fsync_flags)
	URingCmdFixed = 1 << 0 // IORING_URING_CMD_FIXED (uring_cmd_flags): use buf_index
	TimeoutAbs    = 1 << 0 // IORING_TIMEOUT_ABS (timeout_flags)
)

// rw_flags for READ/WRITE (RWF_*, linux/fs.h).
const (
	RWFHipri  = 0x01 // RWF_HIPRI
	RWFDsync  = 0x02 // RWF_DSYNC: per-write O_DSYNC (FUA)
	RWFSync   = 0x04 // RWF_SYNC
	RWFNowait = 0x08 // RWF_NOWAIT
)

// fallocate modes for OpFallocate (FALLOC_FL_*, linux/falloc.h).
const (
	FallocKeepSize  = 0x01 // FALLOC_FL_KEEP_SIZE
	FallocPunchHole = 0x02 // FALLOC_FL_PUNCH_HOLE (needs FallocKeepSize)
	FallocZeroRange = 0x10 // FALLOC_FL_ZERO_RANGE
)

// RegisterOp is an io_uring_register opcode (IORING_REGISTER_*).
type RegisterOp uint32

// io_uring_register opcodes.
const (
	RegisterBuffers     RegisterOp = 0  // IORING_REGISTER_BUFFERS: arg=iovec[], nr=count
	UnregisterBuffers   RegisterOp = 1  // IORING_UNREGISTER_BUFFERS
	RegisterFiles       RegisterOp = 2  // IORING_REGISTER_FILES: arg=s32[], nr=count
	UnregisterFiles     RegisterOp = 3  // IORING_UNREGISTER_FILES
	RegisterEventFd     RegisterOp = 4  // IORING_REGISTER_EVENTFD: arg=s32*, nr=1
	UnregisterEventFd   RegisterOp = 5  // IORING_UNREGISTER_EVENTFD
	RegisterFilesUpdate RegisterOp = 6  // IORING_REGISTER_FILES_UPDATE
	RegisterProbe       RegisterOp = 8  // IORING_REGISTER_PROBE: arg=io_uring_probe + ops[nr]
	RegisterBuffers2    RegisterOp = 15 // IORING_REGISTER_BUFFERS2 (5.13): arg=RsrcRegister, nr=its size
)

// RsrcRegisterSparse is IORING_RSRC_REGISTER_SPARSE (5.19): a table of
// RsrcRegister.Nr empty slots, which ublk's AUTO_BUF_REG fills with each
// request's pages.
const RsrcRegisterSparse = 1 << 0

// RsrcRegister is struct io_uring_rsrc_register (32 bytes), the argument of
// RegisterBuffers2.
type RsrcRegister struct {
	_     structs.HostLayout
	Nr    uint32 // nr: table size
	Flags uint32 // flags: RsrcRegister*
	Resv2 uint64 // resv2
	Data  uint64 // data: iovec[] (0 when sparse)
	Tags  uint64 // tags: u64[] (0 for none)
}

// ProbeOpSupported is IO_URING_OP_SUPPORTED in ProbeOp.Flags.
const ProbeOpSupported = 1 << 0

// SQE geometry. The uring_cmd payload (cmd[]) starts at byte 48 of the SQE
// (addr3) and runs to the end of the slot.
const (
	SizeofSQE     = 64                          // sizeof(struct io_uring_sqe)
	SizeofSQE128  = 128                         // one slot with SetupSQE128
	SizeofCQE     = 16                          // sizeof(struct io_uring_cqe) without SetupCQE32
	SQECmdOffset  = 48                          // offsetof(struct io_uring_sqe, cmd)
	SQECmdSize    = SizeofSQE - SQECmdOffset    // 16
	SQECmdSize128 = SizeofSQE128 - SQECmdOffset // 80
)

// SQRingOffsets is struct io_sqring_offsets (40 bytes): byte offsets of the
// SQ ring fields inside the OffSQRing mapping.
type SQRingOffsets struct {
	_           structs.HostLayout
	Head        uint32 // head
	Tail        uint32 // tail
	RingMask    uint32 // ring_mask
	RingEntries uint32 // ring_entries
	Flags       uint32 // flags (SQ* bits)
	Dropped     uint32 // dropped
	Array       uint32 // array
	Resv1       uint32 // resv1
	UserAddr    uint64 // user_addr (resv2 before 6.5; SetupNoMmap only)
}

// CQRingOffsets is struct io_cqring_offsets (40 bytes): byte offsets of the
// CQ ring fields inside the OffCQRing mapping.
type CQRingOffsets struct {
	_           structs.HostLayout
	Head        uint32 // head
	Tail        uint32 // tail
	RingMask    uint32 // ring_mask
	RingEntries uint32 // ring_entries
	Overflow    uint32 // overflow
	CQEs        uint32 // cqes
	Flags       uint32 // flags
	Resv1       uint32 // resv1
	UserAddr    uint64 // user_addr (resv2 before 6.5; SetupNoMmap only)
}

// IoUringParams is struct io_uring_params (120 bytes), passed to
// io_uring_setup and filled in by the kernel.
type IoUringParams struct {
	_            structs.HostLayout
	SQEntries    uint32        // sq_entries (out: rounded up to a power of two)
	CQEntries    uint32        // cq_entries (in with SetupCQSize; out always)
	Flags        uint32        // flags (Setup* bits)
	SQThreadCPU  uint32        // sq_thread_cpu (SQPOLL)
	SQThreadIdle uint32        // sq_thread_idle (SQPOLL)
	Features     uint32        // features (out: RingFeat* bits)
	WQFd         uint32        // wq_fd (ATTACH_WQ)
	Resv         [3]uint32     // resv, must be zero
	SQOff        SQRingOffsets // sq_off
	CQOff        CQRingOffsets // cq_off
}

// SQE is struct io_uring_sqe (64 bytes). With SetupSQE128 each slot is 128
// bytes: this struct covers the first 64 and the uring_cmd payload continues
// past its end.
type SQE struct {
	_           structs.HostLayout
	Opcode      uint8  // opcode (Op*)
	Flags       uint8  // flags (SQE* bits)
	Ioprio      uint16 // ioprio
	Fd          int32  // fd (a registered-file index with SQEFixedFile)
	Off         uint64 // off / addr2 / {cmd_op u32 @8, __pad1 u32 @12 (must be 0)}
	Addr        uint64 // addr / splice_off_in
	Len         uint32 // len
	OpFlags     uint32 // rw_flags / fsync_flags / poll32_events / timeout_flags / uring_cmd_flags / ...
	UserData    uint64 // user_data, echoed in the CQE
	BufIndex    uint16 // buf_index / buf_group
	Personality uint16 // personality
	SpliceFdIn  int32  // splice_fd_in / file_index / addr_len
	Addr3       uint64 // addr3 / cmd[0:8]
	Pad2        uint64 // __pad2[0] / cmd[8:16]
}

// CQE is struct io_uring_cqe (16 bytes; SetupCQE32 is not used).
type CQE struct {
	_        structs.HostLayout
	UserData uint64 // user_data
	Res      int32  // res: result, or -errno
	Flags    uint32 // flags (CQEF* bits)
}

// GetEventsArg is struct io_uring_getevents_arg (24 bytes), the argp of
// io_uring_enter with EnterExtArg.
type GetEventsArg struct {
	_           structs.HostLayout
	Sigmask     uint64 // sigmask: pointer to a sigset, or 0
	SigmaskSz   uint32 // sigmask_sz
	MinWaitUsec uint32 // pad (min_wait_usec since 6.12)
	Ts          uint64 // ts: pointer to a Timespec, or 0 to wait forever
}

// Timespec is struct __kernel_timespec (16 bytes).
type Timespec struct {
	_    structs.HostLayout
	Sec  int64 // tv_sec
	Nsec int64 // tv_nsec
}

// ProbeHeader is struct io_uring_probe without its flexible ops[] array
// (16 bytes); ProbeOp entries follow it in memory.
type ProbeHeader struct {
	_      structs.HostLayout
	LastOp uint8     // last_op: highest opcode the kernel knows
	OpsLen uint8     // ops_len: entries filled in ops[]
	Resv   uint16    // resv
	Resv2  [3]uint32 // resv2
}

// ProbeOp is struct io_uring_probe_op (8 bytes).
type ProbeOp struct {
	_     structs.HostLayout
	Op    uint8  // op
	Resv  uint8  // resv
	Flags uint16 // flags (ProbeOpSupported)
	Resv2 uint32 // resv2
}
