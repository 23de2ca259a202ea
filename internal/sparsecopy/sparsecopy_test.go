package sparsecopy

import (
	"fmt"
	"testing"
)

// recorder is an io.WriterAt that logs each write as "off+len".
type recorder struct{ writes []string }

func (r *recorder) WriteAt(p []byte, off int64) (int, error) {
	r.writes = append(r.writes, fmt.Sprintf("%d+%d", off, len(p)))
	return len(p), nil
}

func TestWriteNonZero(t *testing.T) {
	const block = 4
	tests := []struct {
		name string
		data string // one char per byte; '.' is zero
		want []string
	}{
		{"all zero", "........", nil},
		{"all data", "xxxxxxxx", []string{"100+8"}},
		{"merged runs", "x.......x..xx...", []string{"100+4", "108+8"}},
		{"zero block between", "xxxx....xxxx", []string{"100+4", "108+4"}},
		{"partial tail", "......x", []string{"104+3"}},
		{"zero tail", "xx..", []string{"100+4"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := []byte(tt.data)
			for i := range p {
				if p[i] == '.' {
					p[i] = 0
				}
			}
			var r recorder
			if err := writeNonZero(&r, p, 100, make([]byte, block)); err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(r.writes) != fmt.Sprint(tt.want) {
				t.Fatalf("writes %v, want %v", r.writes, tt.want)
			}
		})
	}
}
