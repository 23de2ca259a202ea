package main

import (
	"errors"
	"fmt"
	"io"
	"os"
)

// verifyResult counts what verify found.
type verifyResult struct {
	durableWrites int   // durable writes checked
	durableBytes  int64 // bytes they cover
	landed        int   // non-durable writes whose every byte is on disk
	partial       int   // ... some of whose bytes are
	lost          int64 // bytes of a durable write found neither it nor a later write
	stray         int64 // bytes no write of the round touched that differ from the baseline
	problems      []string
}

// expected is the byte write w puts at o.
func (j *journal) expected(w write, o int64) byte {
	if w.kind == kindZeros {
		return 0
	}
	return patternByte(writeKey(j.round, w.seq), o)
}

// verify checks the image content got (read after the kill) against base
// (the content at the start of the round) and the journal. Each byte must
// hold the last durable write covering it or any write issued after that
// one (acknowledged or not, those may or may not have landed, in any
// part); a byte no durable write covers may also still hold the baseline.
// Writes never overlap one in flight, so issue order is the order in which
// the server saw overlapping writes.
func verify(j *journal, base, got []byte) verifyResult {
	var res verifyResult
	done := make([]bool, len(got))
	for i := len(j.writes) - 1; i >= 0; i-- {
		w := j.writes[i]
		if w.off < 0 || w.off+w.len > int64(len(got)) {
			res.problem("write %d [%d,+%d) is outside the %d-byte disk", w.seq, w.off, w.len, len(got))
			continue
		}
		var lost int64
		for o := w.off; o < w.off+w.len; o++ {
			if done[o] {
				continue
			}
			if got[o] == j.expected(w, o) {
				done[o] = true
			} else if j.durable[i] {
				done[o] = true
				lost++
			}
		}
		if j.durable[i] {
			res.durableWrites++
			res.durableBytes += w.len
			if lost > 0 {
				res.lost += lost
				res.problem("flushed write %d [%d,+%d) %c: %d bytes lost", w.seq, w.off, w.len, w.kind, lost)
			}
		}
	}
	res.countLanded(j, got)
	for o := range got {
		if !done[o] && got[o] != base[o] {
			res.stray++
			if res.stray == 1 {
				res.problem("offset %d changed (%#02x, was %#02x) though no write of the round covers it", o, got[o], base[o])
			}
		}
	}
	return res
}

// countLanded classifies the writes that were not durable, for the report
// (a later write over one makes it look partial).
func (res *verifyResult) countLanded(j *journal, got []byte) {
	for i, w := range j.writes {
		if j.durable[i] || w.off+w.len > int64(len(got)) {
			continue
		}
		var n int64
		for o := w.off; o < w.off+w.len; o++ {
			if got[o] == j.expected(w, o) {
				n++
			}
		}
		switch {
		case n == w.len:
			res.landed++
		case n > 0:
			res.partial++
		}
	}
}

func (res *verifyResult) problem(format string, args ...any) {
	if len(res.problems) < 10 {
		res.problems = append(res.problems, fmt.Sprintf(format, args...))
	}
}

// runVerify is the verify subcommand: raw is the image read back (e.g. by
// qemu-img convert -O raw), base the raw content before the round (absent
// or empty: all zeros).
func runVerify(journalPath, rawPath, basePath string) error {
	j, err := readJournal(journalPath)
	if err != nil {
		return err
	}
	got, err := os.ReadFile(rawPath)
	if err != nil {
		return err
	}
	base, err := readBase(basePath, len(got))
	if err != nil {
		return err
	}
	res := verify(j, base, got)
	undurable := len(j.writes) - res.durableWrites
	fmt.Printf("verified=%d verifiedBytes=%d notDurable=%d landed=%d partial=%d lostBytes=%d strayBytes=%d\n",
		res.durableWrites, res.durableBytes, undurable, res.landed, res.partial, res.lost, res.stray)
	for _, p := range res.problems {
		fmt.Println("  " + p)
	}
	if len(res.problems) > 0 {
		return errors.New("the image does not hold what the journal says")
	}
	return nil
}

func readBase(path string, size int) ([]byte, error) {
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return make([]byte, size), nil
	case err != nil:
		return nil, err
	case len(b) == 0:
		return make([]byte, size), nil
	case len(b) != size:
		return nil, fmt.Errorf("baseline %s has %d bytes, the image %d: %w", path, len(b), size, io.ErrUnexpectedEOF)
	}
	return b, nil
}
