package main

import "testing"

// disk applies writes of j (by seq) to a copy of base, the first n bytes
// of each when n >= 0.
func disk(j *journal, base []byte, n int64, seqs ...int) []byte {
	got := append([]byte(nil), base...)
	for _, s := range seqs {
		w := j.writes[s]
		end := w.off + w.len
		if n >= 0 && w.off+n < end {
			end = w.off + n
		}
		for o := w.off; o < end; o++ {
			got[o] = j.expected(w, o)
		}
	}
	return got
}

func TestVerify(t *testing.T) {
	base := make([]byte, 4096)
	for i := range base {
		base[i] = byte(i * 7)
	}
	// 0 durable, 1 durable and partly over 0, 2 not durable over 1, 3 zeros
	// not durable.
	j := &journal{round: 3, writes: []write{
		{0, 100, 1000, kindData}, {1, 600, 1000, kindData}, {2, 1500, 300, kindData}, {3, 3000, 500, kindZeros},
	}, durable: []bool{true, true, false, false}}
	flip := func(b []byte, o int) []byte { b[o] ^= 1; return b }
	tests := []struct {
		name        string
		got         []byte
		lost, stray int64
	}{
		{"durable only", disk(j, base, -1, 0, 1), 0, 0},
		{"everything", disk(j, base, -1, 0, 1, 2, 3), 0, 0},
		{"torn undurable", disk(j, disk(j, base, -1, 0, 1), 17, 2, 3), 0, 0},
		{"durable lost", disk(j, base, -1, 0), 0, 0},
		{"durable torn", disk(j, disk(j, base, -1, 0), 10, 1), 990, 0},
		{"stray byte", flip(disk(j, base, -1, 0, 1), 4000), 0, 1},
		{"flipped durable byte", flip(disk(j, base, -1, 0, 1), 700), 1, 0},
	}
	tests[3].lost = 1000 // write 1 missing entirely
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := verify(j, base, tc.got)
			// A lost byte can hold by chance (1 in 256) what it should.
			if res.lost > tc.lost || res.lost < tc.lost*95/100 || res.stray != tc.stray || res.durableWrites != 2 {
				t.Errorf("lost %d stray %d durable %d, want %d %d 2 (%q)",
					res.lost, res.stray, res.durableWrites, tc.lost, tc.stray, res.problems)
			}
		})
	}
}

func TestJournalParse(t *testing.T) {
	j := &journal{round: -1}
	for _, l := range [][]string{{"R", "5"}, {"W", "0", "10", "20", "d"}, {"W", "1", "0", "5", "z"}, {"D", "1"}} {
		if err := j.parseLine(l); err != nil {
			t.Fatal(err)
		}
	}
	if j.round != 5 || len(j.writes) != 2 || j.durable[0] || !j.durable[1] || j.writes[1].kind != kindZeros {
		t.Errorf("parsed %+v", j)
	}
	for _, bad := range [][]string{{"D", "7"}, {"W", "5", "0", "1", "d"}, {"W", "2", "0", "1", "x"}, {"X"}} {
		if err := j.parseLine(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
