package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// The journal is a text file:
//
//	R round                  first line
//	W seq off len kind       before the write is sent (kind d or z)
//	D seq...                 these writes are durable: acknowledged before a
//	                         FLUSH that completed, or written with FUA
//
// D lines are fsynced before the client issues anything else, so that a
// journal on disk never claims less than the server promised.

type write struct {
	seq  int
	off  int64
	len  int64
	kind byte
}

type journal struct {
	round   int
	writes  []write // in issue order; seq == index
	durable []bool  // by seq
}

func readJournal(path string) (*journal, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	j := &journal{round: -1}
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 1<<20), 16<<20)
	for n := 1; s.Scan(); n++ {
		if err := j.parseLine(strings.Fields(s.Text())); err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, n, err)
		}
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	if j.round < 0 {
		return nil, fmt.Errorf("%s: no R line", path)
	}
	return j, nil
}

func (j *journal) parseLine(f []string) error {
	nums := make([]int64, len(f))
	for i := 1; i < len(f); i++ {
		if f[0] == "W" && i == 4 {
			continue
		}
		v, err := strconv.ParseInt(f[i], 10, 64)
		if err != nil {
			return err
		}
		nums[i] = v
	}
	switch {
	case len(f) == 2 && f[0] == "R":
		j.round = int(nums[1])
	case len(f) == 5 && f[0] == "W":
		if nums[1] != int64(len(j.writes)) || (f[4] != "d" && f[4] != "z") {
			return fmt.Errorf("bad write record %q", f)
		}
		j.writes = append(j.writes, write{seq: int(nums[1]), off: nums[2], len: nums[3], kind: f[4][0]})
		j.durable = append(j.durable, false)
	case len(f) >= 2 && f[0] == "D":
		for _, s := range nums[1:] {
			if s < 0 || s >= int64(len(j.writes)) {
				return fmt.Errorf("durable seq %d was never issued", s)
			}
			j.durable[s] = true
		}
	default:
		return fmt.Errorf("bad record %q", f)
	}
	return nil
}
