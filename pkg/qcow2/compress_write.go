package qcow2

// compressedTail is the partly filled host cluster that WriteCompressed
// packs compressed clusters into, byte by byte as QEMU's qcow2_alloc_bytes
// does. The caller holds mu.
type compressedTail struct {
	next int64 // host offset of the next free byte; 0: none
	// last is the descriptor written most recently into the tail and guest
	// its guest offset: while the active L2 entry still holds it, the host
	// cluster is referenced and so cannot have been freed and reused.
	last  l2Entry
	guest int64
}
