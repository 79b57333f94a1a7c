package uapi

import (
	"strconv"
	"strings"
	"structs"
)

// This file mirrors include/uapi/linux/ublk_cmd.h (kernel UAPI layout, not
// ublksrv's edited copy, which moves the zoned parameters).

// ublk's command opcodes are ioctl-encoded (the kernel's _IOC macro:
// dir<<30 | size<<16 | type<<8 | nr) since 6.4, and GET_FEATURES is matched
// exactly, so the encoded values are the ones sent.
const (
	iocWrite = 1
	iocRead  = 2

	ublkIoctlType = 'u'

	// SizeofCtrlCmd and SizeofIOCmd are the payload sizes encoded in the opcodes.
	SizeofCtrlCmd = 32
	SizeofIOCmd   = 16

	ctrlRead      = iocRead<<30 | SizeofCtrlCmd<<16 | ublkIoctlType<<8
	ctrlReadWrite = (iocRead|iocWrite)<<30 | SizeofCtrlCmd<<16 | ublkIoctlType<<8
	ioReadWrite   = (iocRead|iocWrite)<<30 | SizeofIOCmd<<16 | ublkIoctlType<<8
)

// CtrlOp is a control command sent as IORING_OP_URING_CMD to /dev/ublk-control.
type CtrlOp uint32

// Control commands (UBLK_U_CMD_*).
const (
	CmdGetQueueAffinity  CtrlOp = ctrlRead | 0x01
	CmdGetDevInfo        CtrlOp = ctrlRead | 0x02
	CmdAddDev            CtrlOp = ctrlReadWrite | 0x04
	CmdDelDev            CtrlOp = ctrlReadWrite | 0x05
	CmdStartDev          CtrlOp = ctrlReadWrite | 0x06
	CmdStopDev           CtrlOp = ctrlReadWrite | 0x07
	CmdSetParams         CtrlOp = ctrlReadWrite | 0x08
	CmdGetParams         CtrlOp = ctrlRead | 0x09
	CmdStartUserRecovery CtrlOp = ctrlReadWrite | 0x10
	CmdEndUserRecovery   CtrlOp = ctrlReadWrite | 0x11
	CmdGetDevInfo2       CtrlOp = ctrlRead | 0x12
	CmdGetFeatures       CtrlOp = ctrlRead | 0x13
	CmdDelDevAsync       CtrlOp = ctrlRead | 0x14
)

// String names the command for error messages.
func (op CtrlOp) String() string {
	switch op {
	case CmdGetQueueAffinity:
		return "GET_QUEUE_AFFINITY"
	case CmdGetDevInfo:
		return "GET_DEV_INFO"
	case CmdAddDev:
		return "ADD_DEV"
	case CmdDelDev:
		return "DEL_DEV"
	case CmdStartDev:
		return "START_DEV"
	case CmdStopDev:
		return "STOP_DEV"
	case CmdSetParams:
		return "SET_PARAMS"
	case CmdGetParams:
		return "GET_PARAMS"
	case CmdStartUserRecovery:
		return "START_USER_RECOVERY"
	case CmdEndUserRecovery:
		return "END_USER_RECOVERY"
	case CmdGetDevInfo2:
		return "GET_DEV_INFO2"
	case CmdGetFeatures:
		return "GET_FEATURES"
	case CmdDelDevAsync:
		return "DEL_DEV_ASYNC"
	}
	return "CTRL_CMD(unknown)"
}

// IOCmdOp is a per-queue command sent on /dev/ublkcN.
type IOCmdOp uint32

// Queue commands (UBLK_U_IO_*).
const (
	IOFetchReq          IOCmdOp = ioReadWrite | 0x20
	IOCommitAndFetchReq IOCmdOp = ioReadWrite | 0x21
	IONeedGetData       IOCmdOp = ioReadWrite | 0x22
)

// Feature is a UBLK_F_* device flag negotiated in ADD_DEV.
type Feature uint64

// Device flags (UBLK_F_*).
const (
	FeatSupportZeroCopy     Feature = 1 << 0
	FeatURingCmdCompInTask  Feature = 1 << 1
	FeatNeedGetData         Feature = 1 << 2
	FeatUserRecovery        Feature = 1 << 3
	FeatUserRecoveryReissue Feature = 1 << 4
	FeatUnprivilegedDev     Feature = 1 << 5
	FeatCmdIoctlEncode      Feature = 1 << 6
	FeatUserCopy            Feature = 1 << 7
	FeatZoned               Feature = 1 << 8
	FeatUserRecoveryFailIO  Feature = 1 << 9
	FeatUpdateSize          Feature = 1 << 10
	FeatAutoBufReg          Feature = 1 << 11
	FeatQuiesce             Feature = 1 << 12
	FeatPerIODaemon         Feature = 1 << 13
	FeatBufRegOffDaemon     Feature = 1 << 14
)

// DevState is ublksrv_ctrl_dev_info.state.
type DevState uint16

// Device states (UBLK_S_DEV_*).
const (
	DevDead     DevState = 0
	DevLive     DevState = 1
	DevQuiesced DevState = 2
	DevFailIO   DevState = 3
)

func (s DevState) String() string {
	switch s {
	case DevDead:
		return "dead"
	case DevLive:
		return "live"
	case DevQuiesced:
		return "quiesced"
	case DevFailIO:
		return "fail-io"
	}
	return "unknown"
}

// IOOp is the operation in ublksrv_io_desc.op_flags bits 0-7.
type IOOp uint8

// Request operations (UBLK_IO_OP_*).
const (
	IOOpRead        IOOp = 0
	IOOpWrite       IOOp = 1
	IOOpFlush       IOOp = 2
	IOOpDiscard     IOOp = 3
	IOOpWriteSame   IOOp = 4
	IOOpWriteZeroes IOOp = 5
)

func (o IOOp) String() string {
	switch o {
	case IOOpRead:
		return "read"
	case IOOpWrite:
		return "write"
	case IOOpFlush:
		return "flush"
	case IOOpDiscard:
		return "discard"
	case IOOpWriteSame:
		return "write-same"
	case IOOpWriteZeroes:
		return "write-zeroes"
	}
	return "unknown"
}

// Request flags (UBLK_IO_F_*), already shifted into op_flags.
const (
	IOFlagFailfastDev       = 1 << 8
	IOFlagFailfastTransport = 1 << 9
	IOFlagFailfastDriver    = 1 << 10
	IOFlagMeta              = 1 << 11
	IOFlagFUA               = 1 << 13
	IOFlagNoUnmap           = 1 << 15
	IOFlagSwap              = 1 << 16
)

// Results of FETCH / COMMIT_AND_FETCH CQEs.
const (
	IOResOK          = 0
	IOResNeedGetData = 1
	IOResAbort       = -19 // -ENODEV: device stopping; do not re-issue
)

// Parameter types (UBLK_PARAM_TYPE_*).
const (
	ParamTypeBasic   = 1 << 0
	ParamTypeDiscard = 1 << 1
	ParamTypeDevt    = 1 << 2
	ParamTypeZoned   = 1 << 3
	ParamTypeDMA     = 1 << 4 // 6.15+; older kernels mask it off
)

// Basic attributes (UBLK_ATTR_*).
const (
	AttrReadOnly      = 1 << 0
	AttrRotational    = 1 << 1
	AttrVolatileCache = 1 << 2
	AttrFUA           = 1 << 3
)

// Limits and layout constants.
const (
	MaxQueueDepth = 4096
	MaxDevID      = 1<<20 - 1
	// CmdBufOffset is UBLKSRV_CMD_BUF_OFFSET: where queue 0's descriptor array is mapped.
	CmdBufOffset = 0
	// SizeofIODesc is the size of one ublksrv_io_desc.
	SizeofIODesc = 24
	// IOBufOffset, IOBufBits, TagBits: USER_COPY pread/pwrite offsets.
	IOBufOffset = 0x80000000
	IOBufBits   = 25
	TagBits     = 16
	QIDBits     = 12
	// NewDevID asks ADD_DEV to pick the id.
	NewDevID = 0xFFFFFFFF
	// AnyQueue is the queue_id every control command carries.
	AnyQueue = 0xFFFF
)

// DescStride is the byte distance between two queues' descriptor arrays in
// the /dev/ublkcN mmap space: round_up(4096*24, page) independent of depth.
func DescStride(pageSize int) int64 {
	n := int64(MaxQueueDepth * SizeofIODesc)
	p := int64(pageSize)
	return (n + p - 1) / p * p
}

// CtrlCmd is struct ublksrv_ctrl_cmd (32 bytes), placed at SQE byte 48.
type CtrlCmd struct {
	_          structs.HostLayout
	DevID      uint32 // dev_id
	QueueID    uint16 // queue_id
	Len        uint16 // len: bytes at Addr
	Addr       uint64 // addr: user buffer (off-heap)
	Data       uint64 // data[0]: inline argument
	DevPathLen uint16 // dev_path_len
	Pad        uint16 // pad
	Reserved   uint32 // reserved
}

// CtrlDevInfo is struct ublksrv_ctrl_dev_info (64 bytes).
type CtrlDevInfo struct {
	_             structs.HostLayout
	NrHWQueues    uint16   // nr_hw_queues
	QueueDepth    uint16   // queue_depth
	State         DevState // state
	Pad0          uint16   // pad0
	MaxIOBufBytes uint32   // max_io_buf_bytes
	DevID         uint32   // dev_id
	UblksrvPID    int32    // ublksrv_pid
	Pad1          uint32   // pad1
	Flags         Feature  // flags
	UblksrvFlags  uint64   // ublksrv_flags: opaque to the kernel
	OwnerUID      uint32   // owner_uid
	OwnerGID      uint32   // owner_gid
	Reserved1     uint64   // reserved1
	Reserved2     uint64   // reserved2
}

// IODesc is struct ublksrv_io_desc (24 bytes), written by the kernel into
// the read-only per-queue mmap, one per tag.
type IODesc struct {
	_           structs.HostLayout
	OpFlags     uint32 // op_flags: op in bits 0-7, UBLK_IO_F_* above
	NrSectors   uint32 // nr_sectors: 512-byte units
	StartSector uint64 // start_sector: 512-byte units
	Addr        uint64 // addr
}

// Op returns the request operation.
func (d *IODesc) Op() IOOp { return IOOp(d.OpFlags & 0xff) }

// IOCmd is struct ublksrv_io_cmd (16 bytes), placed at SQE byte 48.
type IOCmd struct {
	_      structs.HostLayout
	QID    uint16 // q_id
	Tag    uint16 // tag
	Result int32  // result: bytes or -errno (COMMIT only)
	Addr   uint64 // addr: per-tag buffer in copy mode; 0 with AUTO_BUF_REG
}

// AutoBufReg is struct ublk_auto_buf_reg: where the kernel registers a
// request's pages (FeatAutoBufReg). It travels in the FETCH and
// COMMIT_AND_FETCH SQE's addr field, not in IOCmd, packed by SQEAddr.
type AutoBufReg struct {
	Index uint16 // index: slot in the ring's sparse buffer table
	Flags uint8  // flags: AutoBufRegFallback or 0
}

// AutoBufRegFallback is UBLK_AUTO_BUF_REG_FALLBACK: deliver the request
// unregistered (IOFNeedRegBuf) instead of failing it when registration
// fails. Unused here: our slots are per tag, so registration cannot find
// one taken.
const AutoBufRegFallback = 1 << 0

// SQEAddr packs r as the kernel reads sqe->addr: bits 0-15 the index,
// 16-23 the flags, the rest reserved (zero).
func (r AutoBufReg) SQEAddr() uint64 { return uint64(r.Index) | uint64(r.Flags)<<16 }

// ParamBasic is struct ublk_param_basic (32 bytes).
type ParamBasic struct {
	_                structs.HostLayout
	Attrs            uint32 // attrs
	LogicalBSShift   uint8  // logical_bs_shift
	PhysicalBSShift  uint8  // physical_bs_shift
	IOOptShift       uint8  // io_opt_shift
	IOMinShift       uint8  // io_min_shift
	MaxSectors       uint32 // max_sectors
	ChunkSectors     uint32 // chunk_sectors
	DevSectors       uint64 // dev_sectors: 512-byte units
	VirtBoundaryMask uint64 // virt_boundary_mask
}

// ParamDiscard is struct ublk_param_discard (20 bytes).
type ParamDiscard struct {
	_                     structs.HostLayout
	DiscardAlignment      uint32 // discard_alignment
	DiscardGranularity    uint32 // discard_granularity
	MaxDiscardSectors     uint32 // max_discard_sectors
	MaxWriteZeroesSectors uint32 // max_write_zeroes_sectors
	MaxDiscardSegments    uint16 // max_discard_segments
	Reserved0             uint16 // reserved0
}

// ParamDevt is struct ublk_param_devt (16 bytes).
type ParamDevt struct {
	_         structs.HostLayout
	CharMajor uint32 // char_major
	CharMinor uint32 // char_minor
	DiskMajor uint32 // disk_major
	DiskMinor uint32 // disk_minor
}

// ParamZoned is struct ublk_param_zoned (32 bytes).
type ParamZoned struct {
	_                    structs.HostLayout
	MaxOpenZones         uint32   // max_open_zones
	MaxActiveZones       uint32   // max_active_zones
	MaxZoneAppendSectors uint32   // max_zone_append_sectors
	Reserved             [20]byte // reserved
}

// ParamDMA is struct ublk_param_dma_align (8 bytes, 6.15+).
type ParamDMA struct {
	_         structs.HostLayout
	Alignment uint32  // alignment: a mask, e.g. 511 for 512-byte alignment
	_         [4]byte // pad
}

// Params is struct ublk_params up to dma (6.15+; 120 bytes). 6.12's ends
// after zoned (112 bytes); a kernel copies min(len, its sizeof) and masks
// the types it does not know, so this prefix is valid everywhere.
type Params struct {
	_       structs.HostLayout
	Len     uint32       // len
	Types   uint32       // types: ParamType* bits
	Basic   ParamBasic   // basic
	Discard ParamDiscard // discard
	Devt    ParamDevt    // devt (read-only)
	Zoned   ParamZoned   // zoned
	DMA     ParamDMA     // dma
	_       [4]byte      // tail padding to 8-byte alignment
}

// Device nodes: the driver names each device after its id (ublk_drv's
// "ublkb%d" block disk and "ublkc%d" char device).
const (
	blockDevPrefix = "/dev/ublkb"
	charDevPrefix  = "/dev/ublkc"
)

// BlockPath is the block device of ublk device id.
func BlockPath(id uint32) string { return blockDevPrefix + strconv.FormatUint(uint64(id), 10) }

// CharPath is the char device (the server's command channel) of device id.
func CharPath(id uint32) string { return charDevPrefix + strconv.FormatUint(uint64(id), 10) }

// ParseBlockPath returns the device id of a ublk block device path
// (/dev/ublkb<id>).
func ParseBlockPath(path string) (uint32, bool) {
	s, ok := strings.CutPrefix(path, blockDevPrefix)
	if !ok || s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, false
	}
	id, err := strconv.ParseUint(s, 10, 32)
	return uint32(id), err == nil
}
