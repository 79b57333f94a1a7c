package linux

import (
	"runtime"
	"structs"
	"unsafe"
)

// fiemapHeader is struct fiemap without its trailing extent array.
type fiemapHeader struct {
	_             structs.HostLayout
	Start         uint64 // fm_start: logical offset to map from
	Length        uint64 // fm_length: bytes to map
	Flags         uint32 // fm_flags: FIEMAP_FLAG_*
	MappedExtents uint32 // fm_mapped_extents: filled in by the kernel
	ExtentCount   uint32 // fm_extent_count: room in the array
	Reserved      uint32
}

// fiemapExtent is struct fiemap_extent.
type fiemapExtent struct {
	_          structs.HostLayout
	Logical    uint64 // fe_logical
	Physical   uint64 // fe_physical
	Length     uint64 // fe_length
	Reserved64 [2]uint64
	Flags      uint32 // fe_flags: FIEMAP_EXTENT_*
	Reserved   [3]uint32
}

const (
	sizeofFiemapHeader = 32
	sizeofFiemapExtent = 56
)

// FIEMAP request and extent flags.
const (
	FiemapFlagSync = 0x1 // sync the file before mapping

	FiemapExtentLast          = 0x1
	FiemapExtentUnknown       = 0x2
	FiemapExtentDelalloc      = 0x4
	FiemapExtentEncoded       = 0x8
	FiemapExtentDataEncrypted = 0x80
	FiemapExtentNotAligned    = 0x100
	FiemapExtentDataInline    = 0x200
	FiemapExtentDataTail      = 0x400
	FiemapExtentUnwritten     = 0x800
	FiemapExtentMerged        = 0x1000
	FiemapExtentShared        = 0x2000
)

// Extent maps Length bytes of a file at Logical to its device at Physical.
type Extent struct {
	Logical  int64 `json:"logical"`
	Physical int64 `json:"physical"`
	Length   int64 `json:"length"`
}

// MappedExtent is one extent FIEMAP reported, with its FIEMAP_EXTENT_* flags.
type MappedExtent struct {
	Extent
	Flags uint32
}

// fiemapBatch is how many extents one FIEMAP call asks for.
const fiemapBatch = 256

// fiemapRequest is the buffer one FIEMAP call fills.
type fiemapRequest struct {
	_       structs.HostLayout
	hdr     fiemapHeader
	extents [fiemapBatch]fiemapExtent
}

// Fiemap returns where the bytes [start, start+length) of the file open as
// fd lie on its device, in logical order, calling FS_IOC_FIEMAP as often as
// needed. flags are FIEMAP_FLAG_* (FiemapFlagSync flushes the file first).
func Fiemap(fd int, start, length uint64, flags uint32) ([]MappedExtent, error) {
	req := new(fiemapRequest)
	var out []MappedExtent
	end := start + length
	for start < end {
		*req = fiemapRequest{}
		req.hdr = fiemapHeader{Start: start, Length: end - start, Flags: flags, ExtentCount: fiemapBatch}
		err := ioctl(fd, ioctlFIEMAP, unsafe.Pointer(req))
		runtime.KeepAlive(req)
		if err != nil {
			return nil, err
		}
		n := min(req.hdr.MappedExtents, fiemapBatch)
		if n == 0 {
			break
		}
		last := false
		for _, e := range req.extents[:n] {
			out = append(out, MappedExtent{
				Extent: Extent{Logical: int64(e.Logical), Physical: int64(e.Physical), Length: int64(e.Length)},
				Flags:  e.Flags,
			})
			start = e.Logical + e.Length
			last = e.Flags&FiemapExtentLast != 0
		}
		if last {
			break
		}
	}
	return out, nil
}
