package imagecli

import (
	"errors"
	"math"
	"testing"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", 0, true},
		{"1023", 1023, true},
		{"512b", 512, true},
		{"512B", 512, true},
		{"1k", 1 << 10, true},
		{"1K", 1 << 10, true},
		{"64k", 64 << 10, true},
		{"1M", 1 << 20, true},
		{"1g", 1 << 30, true},
		{"1G", 1 << 30, true},
		{"1T", 1 << 40, true},
		{"1P", 1 << 50, true},
		{"1E", 1 << 60, true},
		{"1KiB", 1 << 10, true},
		{"10Gi", 10 << 30, true},
		{"2MiB", 2 << 20, true},
		{"1.5G", 3 << 29, true},
		{"0.5k", 512, true},
		{"1.0000001k", 1024, true}, // rounded down to whole bytes
		{"0x1000", 4096, true},
		{"0X10", 16, true},
		{"0x10k", 16 << 10, true},
		{" 10", 10, true},
		{"9223372036854775807", math.MaxInt64, true},
		{"7E", 7 << 60, true},
		{"", 0, false},
		{"G", 0, false},
		{"-1", 0, false},
		{"+1", 0, false},
		{"1.5", 0, false},  // fraction without a unit
		{"1.5b", 0, false}, // fraction of bytes
		{"1e3", 0, false},
		{"10.5.1G", 0, false},
		{"1Q", 0, false},
		{"1GB", 0, false}, // ambiguous decimal unit: refused
		{"1Gib", 0, false},
		{"1bi", 0, false},
		{"8E", 0, false},
		{"16E", 0, false},
		{"9223372036854775808", 0, false},
		{"0x", 0, false},
		{"0xg", 0, false},
		{"0x1.5k", 0, false},
		{"1 G", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := parseSize(tt.in)
			if tt.ok {
				if err != nil || got != tt.want {
					t.Fatalf("parseSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
				}
				return
			}
			if !errors.Is(err, errInvalidSize) {
				t.Fatalf("parseSize(%q) = %d, %v; want errInvalidSize", tt.in, got, err)
			}
		})
	}
}

func TestParseResize(t *testing.T) {
	const cur = 1 << 30
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"2G", 2 << 30, true},
		{"+1G", 2 << 30, true},
		{"-512M", 512 << 20, true},
		{"-2G", -(1 << 30), true}, // negative: the caller refuses it
		{"+", 0, false},
		{"+x", 0, false},
		{"+9223372036854775807", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := parseResize(tt.in, cur)
			if (err == nil) != tt.ok || got != tt.want {
				t.Fatalf("parseResize(%q, %d) = %d, %v; want %d, ok=%v", tt.in, cur, got, err, tt.want, tt.ok)
			}
		})
	}
}

// TestFormatSize pins QEMU's size_to_str output, as seen in qemu-img info.
func TestFormatSize(t *testing.T) {
	tests := []struct {
		in   int64
		want string
	}{
		{0, "0 B"},
		{1, "1 B"},
		{999, "999 B"},
		{1000, "0.977 KiB"},
		{1024, "1 KiB"},
		{4096, "4 KiB"},
		{200704, "196 KiB"},
		{1536 << 10, "1.5 MiB"},
		{1234567, "1.18 MiB"},
		{1 << 30, "1 GiB"},
		{10 << 30, "10 GiB"},
		{1023 << 20, "0.999 GiB"},
		{1 << 60, "1 EiB"},
		{math.MaxInt64, "8 EiB"},
	}
	for _, tt := range tests {
		if got := formatSize(tt.in); got != tt.want {
			t.Errorf("formatSize(%d) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
