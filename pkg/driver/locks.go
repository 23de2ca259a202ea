package driver

import "sync"

// inflight is the set of objects (volume and snapshot ids, volume names)
// an RPC is working on. A second RPC on the same object does not wait: it
// gets Aborted (errBusy) and the CO retries, as CSI recommends. The mutex
// guards only the map, never I/O.
type inflight struct {
	mu   sync.Mutex
	keys map[string]struct{}
}

func newInflight() *inflight { return &inflight{keys: map[string]struct{}{}} }

// acquire marks every key busy, or none of them if one already is; release
// undoes it.
func (f *inflight) acquire(keys ...string) (release func(), err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, k := range keys {
		if _, busy := f.keys[k]; busy {
			return nil, newError(errBusy, "%s: an operation is already in progress", k)
		}
	}
	for _, k := range keys {
		f.keys[k] = struct{}{}
	}
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, k := range keys {
			delete(f.keys, k)
		}
	}, nil
}
