package nbdattach

import "sync"

// inflight bounds the requests a connection processes at once, by count and
// by buffered bytes, and lets the reader wait for all of them to finish.
// The reader acquires before it reads a WRITE payload, so a client cannot
// make the server buffer more than maxBytes by pipelining.
type inflight struct {
	mu       sync.Mutex
	cond     sync.Cond
	count    int
	bytes    int
	maxCount int
	maxBytes int
}

func newInflight(maxCount, maxBytes int) *inflight {
	l := &inflight{maxCount: maxCount, maxBytes: maxBytes}
	l.cond.L = &l.mu
	return l
}

// clamp keeps a single request bigger than the byte budget admissible: it
// then runs alone.
func (l *inflight) clamp(n int) int { return min(n, l.maxBytes) }

// acquire blocks until a request of n bytes fits.
func (l *inflight) acquire(n int) {
	n = l.clamp(n)
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.count >= l.maxCount || (l.count > 0 && l.bytes+n > l.maxBytes) {
		l.cond.Wait()
	}
	l.count++
	l.bytes += n
}

// release returns what acquire(n) took.
func (l *inflight) release(n int) {
	n = l.clamp(n)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.count--
	l.bytes -= n
	l.cond.Broadcast()
}

// wait blocks until nothing is in flight.
func (l *inflight) wait() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.count > 0 {
		l.cond.Wait()
	}
}
