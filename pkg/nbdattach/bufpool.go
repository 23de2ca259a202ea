package nbdattach

import (
	"math/bits"
	"sync"
)

// bufPool recycles READ and WRITE buffers in power-of-two size classes from
// 4 KiB up to one that holds a reply header plus MaxBlockSize, so steady
// I/O does not allocate. Pointers to slices are pooled so that Put does not
// allocate either.
type bufPool struct {
	classes [numBufClasses]sync.Pool
}

const (
	minBufShift   = 12
	numBufClasses = 27 - minBufShift // up to 64 MiB > simpleReplySize+MaxBlockSize
)

// bufClass returns the size class of an n-byte buffer, or -1 if n is too
// large to pool.
func bufClass(n int) int {
	c := max(bits.Len(uint(max(n, 1)-1)), minBufShift) - minBufShift
	if c >= numBufClasses {
		return -1
	}
	return c
}

// get returns a buffer of length n.
func (p *bufPool) get(n int) *[]byte {
	c := bufClass(n)
	if c < 0 {
		b := make([]byte, n)
		return &b
	}
	if v, ok := p.classes[c].Get().(*[]byte); ok {
		*v = (*v)[:n]
		return v
	}
	b := make([]byte, n, 1<<(c+minBufShift))
	return &b
}

// put recycles a buffer from get.
func (p *bufPool) put(b *[]byte) {
	c := bufClass(cap(*b))
	if c < 0 || cap(*b) != 1<<(c+minBufShift) {
		return
	}
	p.classes[c].Put(b)
}
