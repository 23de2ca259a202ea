package nbdattach

import "testing"

func TestBufPoolSizes(t *testing.T) {
	var p bufPool
	for _, n := range []int{0, 1, 4096, 4097, simpleReplySize + MaxBlockSize, 64 << 20, 64<<20 + 1} {
		b := p.get(n)
		if len(*b) != n {
			t.Fatalf("get(%d) has length %d", n, len(*b))
		}
		p.put(b)
		if b2 := p.get(n); len(*b2) != n {
			t.Fatalf("second get(%d) has length %d", n, len(*b2))
		}
	}
}
