package imagecli

import (
	"strings"
	"testing"
)

// FuzzParseSize: parseSize never panics, and what it accepts is a
// non-negative size that survives a round trip through its decimal form.
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"1G", "1.5g", "0x10k", "64KiB", "9223372036854775807", "0.5", "-1", "1e3", "0x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseSize(s)
		if err != nil {
			return
		}
		if n < 0 {
			t.Fatalf("parseSize(%q) = %d", s, n)
		}
		if back, err := parseSize(sprintf("%d", n)); err != nil || back != n {
			t.Fatalf("round trip of %d: %d, %v", n, back, err)
		}
	})
}

// FuzzSplitOptions: splitting never panics, and re-joining the pairs with
// QEMU's ",," escape gives options that split the same way.
func FuzzSplitOptions(f *testing.F) {
	for _, s := range []string{"a=1,b=2", "backing_file=x,,y", "lazy_refcounts", ",", "=", "a=,b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		pairs, err := splitOptions(s)
		if err != nil {
			return
		}
		var parts []string
		for _, kv := range pairs {
			if kv[0] == "" {
				t.Fatalf("empty key from %q", s)
			}
			esc := func(v string) string { return strings.ReplaceAll(v, ",", ",,") }
			parts = append(parts, esc(kv[0])+"="+esc(kv[1]))
		}
		again, err := splitOptions(strings.Join(parts, ","))
		if err != nil || sprintf("%q", again) != sprintf("%q", pairs) {
			t.Fatalf("%q -> %q -> %q, %v", s, pairs, again, err)
		}
	})
}
