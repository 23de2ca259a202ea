package imagecli

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func TestSplitOptions(t *testing.T) {
	tests := []struct {
		in   string
		want [][2]string
		ok   bool
	}{
		{"cluster_size=4096", [][2]string{{"cluster_size", "4096"}}, true},
		{"a=1,b=2", [][2]string{{"a", "1"}, {"b", "2"}}, true},
		{"backing_file=a,,b.qcow2,backing_fmt=raw", [][2]string{{"backing_file", "a,b.qcow2"}, {"backing_fmt", "raw"}}, true},
		{"lazy_refcounts", [][2]string{{"lazy_refcounts", "on"}}, true},
		{"k=v=w", [][2]string{{"k", "v=w"}}, true},
		{"", nil, false},
		{"a=1,", nil, false},
		{",a=1", nil, false},
		{"=1", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := splitOptions(tt.in)
			if (err == nil) != tt.ok || !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("splitOptions(%q) = %q, %v; want %q, ok=%v", tt.in, got, err, tt.want, tt.ok)
			}
		})
	}
}

func TestParseCreateOptions(t *testing.T) {
	tests := []struct {
		name    string
		format  string
		args    []string
		want    qcow2.CreateOptions
		size    int64
		wantErr error // nil: success; errAny: any error
	}{
		{name: "none", format: "qcow2"},
		{name: "all qcow2", format: "qcow2",
			args: []string{"cluster_size=4k,refcount_bits=8,lazy_refcounts=on", "backing_file=b.img,backing_fmt=raw,size=1M"},
			want: qcow2.CreateOptions{ClusterSize: 4096, RefcountBits: 8, LazyRefcounts: true, BackingFile: "b.img", BackingFormat: "raw"},
			size: 1 << 20},
		{name: "later wins", format: "qcow2", args: []string{"lazy_refcounts=on", "lazy_refcounts=off"}},
		{name: "bool spellings", format: "qcow2", args: []string{"lazy_refcounts=yes"}, want: qcow2.CreateOptions{LazyRefcounts: true}},
		{name: "accepted defaults", format: "qcow2", args: []string{"compat=1.1,compression_type=zlib,extended_l2=off,preallocation=off"}},
		{name: "compat v3", format: "qcow2", args: []string{"compat=v3"}},
		{name: "raw size", format: "raw", args: []string{"size=1G"}, size: 1 << 30},
		{name: "unknown key", format: "qcow2", args: []string{"foo=bar"}, wantErr: errAny},
		{name: "qcow2 key on raw", format: "raw", args: []string{"cluster_size=4k"}, wantErr: errAny},
		{name: "bad cluster size", format: "qcow2", args: []string{"cluster_size=big"}, wantErr: errInvalidSize},
		{name: "zero cluster size", format: "qcow2", args: []string{"cluster_size=0"}, wantErr: qcow2.ErrInvalid},
		{name: "bad refcount bits", format: "qcow2", args: []string{"refcount_bits=x"}, wantErr: qcow2.ErrInvalid},
		{name: "bad bool", format: "qcow2", args: []string{"lazy_refcounts=maybe"}, wantErr: errAny},
		{name: "compat v2", format: "qcow2", args: []string{"compat=0.10"}, wantErr: qcow2.ErrUnsupported},
		{name: "zstd", format: "qcow2", args: []string{"compression_type=zstd"}, want: qcow2.CreateOptions{CompressionType: qcow2.CompressionZstd}},
		{name: "zstd then zlib", format: "qcow2", args: []string{"compression_type=zstd", "compression_type=zlib"}},
		{name: "zstd v3", format: "qcow2", args: []string{"compat=1.1,compression_type=zstd"}, want: qcow2.CreateOptions{CompressionType: qcow2.CompressionZstd}},
		{name: "compat v2 zstd", format: "qcow2", args: []string{"compat=0.10,compression_type=zstd"}, wantErr: qcow2.ErrInvalid},
		{name: "zstd compat v2", format: "qcow2", args: []string{"compression_type=zstd", "compat=v2"}, wantErr: qcow2.ErrInvalid},
		{name: "compat v2 zstd then zlib", format: "qcow2", args: []string{"compat=0.10,compression_type=zstd,compression_type=zlib"}, wantErr: qcow2.ErrUnsupported},
		{name: "unknown compression", format: "qcow2", args: []string{"compression_type=lz4"}, wantErr: qcow2.ErrUnsupported},
		{name: "unknown compat", format: "qcow2", args: []string{"compat=2.0"}, wantErr: qcow2.ErrUnsupported},
		{name: "extended l2", format: "qcow2", args: []string{"extended_l2=on"}, wantErr: qcow2.ErrUnsupported},
		{name: "preallocation", format: "qcow2", args: []string{"preallocation=full"}, wantErr: qcow2.ErrUnsupported},
		{name: "help", format: "qcow2", args: []string{"cluster_size=4k,help"}, wantErr: errOptionsHelp},
		{name: "question mark", format: "raw", args: []string{"?"}, wantErr: errOptionsHelp},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseCreateOptions(tt.format, tt.args)
			switch {
			case tt.wantErr == nil && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tt.wantErr == errAny && err == nil, tt.wantErr != nil && tt.wantErr != errAny && !errors.Is(err, tt.wantErr):
				t.Fatalf("error = %v, want %v", err, tt.wantErr)
			case tt.wantErr != nil:
				return
			}
			if got.qcow2 != tt.want || got.size != tt.size || got.format != tt.format {
				t.Fatalf("got %+v size %d, want %+v size %d", got.qcow2, got.size, tt.want, tt.size)
			}
		})
	}
}

var errAny = errors.New("any error")

func TestFormattingLine(t *testing.T) {
	tests := []struct {
		name string
		o    createOptions
		want string
	}{
		{"defaults", createOptions{format: "qcow2", size: 1 << 30},
			"Formatting 'x.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"},
		{"options", createOptions{format: "qcow2", size: 10 << 20, qcow2: qcow2.CreateOptions{ClusterSize: 4096, RefcountBits: 8, LazyRefcounts: true}},
			"Formatting 'x.qcow2', fmt=qcow2 cluster_size=4096 extended_l2=off compression_type=zlib size=10485760 lazy_refcounts=on refcount_bits=8"},
		{"backing", createOptions{format: "qcow2", size: 1 << 30, qcow2: qcow2.CreateOptions{BackingFile: "a.qcow2", BackingFormat: "qcow2"}},
			"Formatting 'x.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 backing_file=a.qcow2 backing_fmt=qcow2 lazy_refcounts=off refcount_bits=16"},
		{"zstd", createOptions{format: "qcow2", size: 1 << 20, qcow2: qcow2.CreateOptions{CompressionType: qcow2.CompressionZstd}},
			"Formatting 'x.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zstd size=1048576 lazy_refcounts=off refcount_bits=16"},
		{"raw", createOptions{format: "raw", size: 1 << 20}, "Formatting 'x.qcow2', fmt=raw size=1048576"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.o.formattingLine("x.qcow2"); got != tt.want {
				t.Fatalf("got  %s\nwant %s", got, tt.want)
			}
		})
	}
}

func TestOptionsHelp(t *testing.T) {
	for _, key := range []string{"cluster_size=<size>", "refcount_bits=<num>", "lazy_refcounts=<bool (on/off)>", "backing_file=<str>", "size=<size>", "(zlib or zstd)"} {
		if !strings.Contains(optionsHelp("qcow2"), key) {
			t.Errorf("qcow2 options help lacks %q", key)
		}
	}
	if strings.Contains(optionsHelp("raw"), "cluster_size") {
		t.Errorf("raw options help lists cluster_size:\n%s", optionsHelp("raw"))
	}
}
