package ublk

import (
	"runtime"

	"golang.org/x/sys/unix"

	"github.com/dbdublk/dbdublk/ublk/uapi"
)

// RequestPath drives one queue's request path (the very code that serves the
// kernel: start, issue, onFileDone, complete, with the backend's file I/O on
// a real io_uring) with only the ublk commands replaced: requests are handed
// to the queue as FETCH would hand them, and the results it would commit are
// returned. Like a queue, it runs on one locked OS thread. It is for the
// tests of backends (this package's and their own) on machines without a
// ublk driver; a server never uses it.
type RequestPath struct {
	q     *queue
	batch chan []Request
	out   chan []Result
	setup chan error
	done  chan struct{}
}

// Request is one request for RequestPath.Do: a descriptor, and for a write
// the data the kernel would have copied into the tag's buffer.
type Request struct {
	Desc uapi.IODesc
	Data []byte
}

// Result is what the queue would commit for a request, and for a read the
// bytes it would hand the kernel.
type Result struct {
	Res  int32
	Data []byte
}

// NewRequestPath sets up a queue of depth tags with bufSize-byte buffers
// serving b.
func NewRequestPath(b Backend, depth, bufSize int) (*RequestPath, error) {
	p := &RequestPath{batch: make(chan []Request), out: make(chan []Result), setup: make(chan error), done: make(chan struct{})}
	// Slot fixedChar must hold a descriptor; nothing is issued on it here.
	p.q = newQueue(0, depth, bufSize, b.FD(), false, b, func(string, ...any) {})
	p.q.descs = make([]uapi.IODesc, depth)
	go p.run()
	if err := <-p.setup; err != nil {
		return nil, err
	}
	return p, nil
}

func (p *RequestPath) run() {
	defer close(p.done)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := p.q.setupRing(); err != nil {
		p.q.teardown()
		p.setup <- err
		return
	}
	p.setup <- nil
	defer p.q.teardown()
	for reqs := range p.batch {
		results := make([]Result, len(reqs))
		pending := len(reqs)
		committed := make([]bool, len(reqs))
		p.q.commit = func(tag int, res int32) {
			committed[tag] = true
			results[tag].Res = res
			if res > 0 && p.q.tags[tag].desc.Op() == uapi.IOOpRead {
				results[tag].Data = append([]byte(nil), p.q.buf(tag)[:res]...)
			}
			pending--
		}
		for tag, r := range reqs {
			copy(p.q.buf(tag), r.Data)
			p.q.descs[tag] = r.Desc
			p.q.onRequest(tag, uapi.IOResOK)
		}
		for pending > 0 {
			if err := p.q.waitAndDispatch(); err != nil {
				// The ring itself failed: what is still pending will
				// never complete; report it as the kernel would see it.
				p.q.logf("%v", err)
				for i := range results {
					if !committed[i] {
						results[i].Res = -int32(unix.EIO)
					}
				}
				break
			}
		}
		p.out <- results
	}
}

// Do serves reqs concurrently, request i on tag i, and returns once every
// one has completed.
func (p *RequestPath) Do(reqs ...Request) []Result {
	p.batch <- reqs
	return <-p.out
}

// Stats are the queue's counters.
func (p *RequestPath) Stats() QueueStats { return p.q.stats.snapshot() }

// Close stops the queue thread and frees its ring.
func (p *RequestPath) Close() {
	close(p.batch)
	<-p.done
}
