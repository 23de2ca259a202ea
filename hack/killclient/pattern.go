package main

// The data of every write is a function of (round, seq, disk offset), so
// the journal need not carry it and a byte found on disk can be traced to
// the write that put it there. Zero writes (NBD_CMD_WRITE_ZEROES) leave 0.

const (
	kindData  = 'd'
	kindZeros = 'z'
)

func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

// writeKey is the pattern key of write seq of round.
func writeKey(round, seq int) uint64 {
	return splitmix64(uint64(round)<<32 | uint64(uint32(seq)))
}

// fillPattern fills b with the bytes a write of key puts at off.
func fillPattern(b []byte, key uint64, off int64) {
	for i := range b {
		b[i] = patternByte(key, off+int64(i))
	}
}

// patternByte is the byte at disk offset o of the write with key.
func patternByte(key uint64, o int64) byte {
	w := splitmix64(key ^ uint64(o>>3)*0xff51afd7ed558ccd)
	return byte(w >> (uint(o&7) * 8))
}
