package uapi

import (
	"testing"
	"unsafe"
)

// Sizes and offsets below are the kernel's (ublk_cmd.h compiled with gcc on
// 6.12), recorded in the project's ublk fact sheet.
func TestUblkLayout(t *testing.T) {
	check := func(name string, got, want uintptr) {
		t.Helper()
		if got != want {
			t.Errorf("%s = %d, want %d", name, got, want)
		}
	}
	var c CtrlCmd
	check("sizeof(ublksrv_ctrl_cmd)", unsafe.Sizeof(c), 32)
	check("ctrl_cmd.queue_id", unsafe.Offsetof(c.QueueID), 4)
	check("ctrl_cmd.len", unsafe.Offsetof(c.Len), 6)
	check("ctrl_cmd.addr", unsafe.Offsetof(c.Addr), 8)
	check("ctrl_cmd.data", unsafe.Offsetof(c.Data), 16)
	check("ctrl_cmd.dev_path_len", unsafe.Offsetof(c.DevPathLen), 24)
	check("ctrl_cmd.reserved", unsafe.Offsetof(c.Reserved), 28)

	var i CtrlDevInfo
	check("sizeof(ublksrv_ctrl_dev_info)", unsafe.Sizeof(i), 64)
	check("dev_info.queue_depth", unsafe.Offsetof(i.QueueDepth), 2)
	check("dev_info.state", unsafe.Offsetof(i.State), 4)
	check("dev_info.max_io_buf_bytes", unsafe.Offsetof(i.MaxIOBufBytes), 8)
	check("dev_info.dev_id", unsafe.Offsetof(i.DevID), 12)
	check("dev_info.ublksrv_pid", unsafe.Offsetof(i.UblksrvPID), 16)
	check("dev_info.flags", unsafe.Offsetof(i.Flags), 24)
	check("dev_info.ublksrv_flags", unsafe.Offsetof(i.UblksrvFlags), 32)
	check("dev_info.owner_uid", unsafe.Offsetof(i.OwnerUID), 40)
	check("dev_info.reserved1", unsafe.Offsetof(i.Reserved1), 48)
	check("dev_info.reserved2", unsafe.Offsetof(i.Reserved2), 56)

	var d IODesc
	check("sizeof(ublksrv_io_desc)", unsafe.Sizeof(d), SizeofIODesc)
	check("io_desc.nr_sectors", unsafe.Offsetof(d.NrSectors), 4)
	check("io_desc.start_sector", unsafe.Offsetof(d.StartSector), 8)
	check("io_desc.addr", unsafe.Offsetof(d.Addr), 16)

	var io IOCmd
	check("sizeof(ublksrv_io_cmd)", unsafe.Sizeof(io), 16)
	check("io_cmd.tag", unsafe.Offsetof(io.Tag), 2)
	check("io_cmd.result", unsafe.Offsetof(io.Result), 4)
	check("io_cmd.addr", unsafe.Offsetof(io.Addr), 8)

	var p Params
	check("sizeof(ublk_params) up to dma", unsafe.Sizeof(p), 120)
	check("params.types", unsafe.Offsetof(p.Types), 4)
	check("params.basic", unsafe.Offsetof(p.Basic), 8)
	check("params.discard", unsafe.Offsetof(p.Discard), 40)
	check("params.devt", unsafe.Offsetof(p.Devt), 60)
	check("params.zoned", unsafe.Offsetof(p.Zoned), 76)
	check("params.dma", unsafe.Offsetof(p.DMA), 108)
	check("sizeof(ublk_param_dma_align)", unsafe.Sizeof(p.DMA), 8)
	check("sizeof(ublk_param_basic)", unsafe.Sizeof(p.Basic), 32)
	check("basic.logical_bs_shift", unsafe.Offsetof(p.Basic.LogicalBSShift), 4)
	check("basic.max_sectors", unsafe.Offsetof(p.Basic.MaxSectors), 8)
	check("basic.chunk_sectors", unsafe.Offsetof(p.Basic.ChunkSectors), 12)
	check("basic.dev_sectors", unsafe.Offsetof(p.Basic.DevSectors), 16)
	check("basic.virt_boundary_mask", unsafe.Offsetof(p.Basic.VirtBoundaryMask), 24)
	check("sizeof(ublk_param_discard)", unsafe.Sizeof(p.Discard), 20)
	check("discard.max_write_zeroes_sectors", unsafe.Offsetof(p.Discard.MaxWriteZeroesSectors), 12)
	check("discard.max_discard_segments", unsafe.Offsetof(p.Discard.MaxDiscardSegments), 16)
	check("sizeof(ublk_param_devt)", unsafe.Sizeof(p.Devt), 16)
	check("sizeof(ublk_param_zoned)", unsafe.Sizeof(p.Zoned), 32)
}

func TestUblkOpcodes(t *testing.T) {
	want := map[string][2]uint32{
		"GET_QUEUE_AFFINITY":  {uint32(CmdGetQueueAffinity), 0x80207501},
		"GET_DEV_INFO":        {uint32(CmdGetDevInfo), 0x80207502},
		"ADD_DEV":             {uint32(CmdAddDev), 0xC0207504},
		"DEL_DEV":             {uint32(CmdDelDev), 0xC0207505},
		"START_DEV":           {uint32(CmdStartDev), 0xC0207506},
		"STOP_DEV":            {uint32(CmdStopDev), 0xC0207507},
		"SET_PARAMS":          {uint32(CmdSetParams), 0xC0207508},
		"GET_PARAMS":          {uint32(CmdGetParams), 0x80207509},
		"START_USER_RECOVERY": {uint32(CmdStartUserRecovery), 0xC0207510},
		"END_USER_RECOVERY":   {uint32(CmdEndUserRecovery), 0xC0207511},
		"GET_DEV_INFO2":       {uint32(CmdGetDevInfo2), 0x80207512},
		"GET_FEATURES":        {uint32(CmdGetFeatures), 0x80207513},
		"DEL_DEV_ASYNC":       {uint32(CmdDelDevAsync), 0x80207514},
		"FETCH_REQ":           {uint32(IOFetchReq), 0xC0107520},
		"COMMIT_AND_FETCH":    {uint32(IOCommitAndFetchReq), 0xC0107521},
		"NEED_GET_DATA":       {uint32(IONeedGetData), 0xC0107522},
	}
	for name, v := range want {
		if v[0] != v[1] {
			t.Errorf("%s = %#x, want %#x", name, v[0], v[1])
		}
	}
	if CmdAddDev.String() != "ADD_DEV" || CmdGetFeatures.String() != "GET_FEATURES" {
		t.Errorf("CtrlOp names wrong: %v %v", CmdAddDev, CmdGetFeatures)
	}
}

func TestDescStride(t *testing.T) {
	if got := DescStride(4096); got != 98304 {
		t.Errorf("stride(4K pages) = %d, want 98304", got)
	}
	if got := DescStride(65536); got != 0x20000 {
		t.Errorf("stride(64K pages) = %#x, want 0x20000", got)
	}
}

// TestAutoBufRegAddr checks the sqe->addr packing of struct
// ublk_auto_buf_reg: index in bits 0-15, flags in 16-23, nothing above.
func TestAutoBufRegAddr(t *testing.T) {
	for _, c := range []struct {
		r    AutoBufReg
		want uint64
	}{
		{AutoBufReg{}, 0},
		{AutoBufReg{Index: 5}, 5},
		{AutoBufReg{Index: 0xffff}, 0xffff},
		{AutoBufReg{Index: 3, Flags: AutoBufRegFallback}, 0x10003},
	} {
		if got := c.r.SQEAddr(); got != c.want {
			t.Errorf("%+v.SQEAddr() = %#x, want %#x", c.r, got, c.want)
		}
	}
	if FeatAutoBufReg != 1<<11 || FeatSupportZeroCopy != 1 {
		t.Errorf("AUTO_BUF_REG = %#x, SUPPORT_ZERO_COPY = %#x; want bits 11 and 0", FeatAutoBufReg, FeatSupportZeroCopy)
	}
}

func TestFeatureBits(t *testing.T) {
	// 6.12 answers GET_FEATURES with 0x1FE and USER_COPY|USER_RECOVERY
	// negotiates to 0xCA; both are sums of the named bits.
	if f := FeatURingCmdCompInTask | FeatNeedGetData | FeatUserRecovery | FeatUserRecoveryReissue |
		FeatUnprivilegedDev | FeatCmdIoctlEncode | FeatUserCopy | FeatZoned; f != 0x1FE {
		t.Errorf("6.12 feature set = %#x, want 0x1fe", f)
	}
	if f := FeatUserCopy | FeatUserRecovery | FeatCmdIoctlEncode | FeatURingCmdCompInTask; f != 0xCA {
		t.Errorf("negotiated = %#x, want 0xca", f)
	}
	var d IODesc
	d.OpFlags = uint32(IOOpWrite) | IOFlagFUA
	if d.Op() != IOOpWrite || d.OpFlags&IOFlagFUA == 0 {
		t.Errorf("op decode wrong: %v", d.Op())
	}
}
