package imagecli

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Image formats the CLI reads and writes.
const (
	formatQcow2 = "qcow2"
	formatRaw   = "raw"
)

var errOptionsHelp = errors.New("options help requested")

// createOptions are the -o options of create and convert, plus -b/-F, in
// the units qemu-img prints them.
type createOptions struct {
	format string
	// compress makes convert write compressed clusters (-c).
	compress bool
	size     int64
	hasSize  bool
	// compat is the -o compat value as given; "" means the default, 1.1.
	compat string
	qcow2  qcow2.CreateOptions // size is copied in at creation
}

// option is one -o key: its help line and how to apply a value. Options are
// listed in qemu-img's order.
type option struct {
	key, kind, help string
	apply           func(o *createOptions, v string) error
}

func qcow2Options() []option {
	return []option{
		{"backing_file", "str", "File name of a base image", func(o *createOptions, v string) error {
			o.qcow2.BackingFile = v
			return nil
		}},
		{"backing_fmt", "str", "Image format of the base image (qcow2 or raw)", func(o *createOptions, v string) error {
			o.qcow2.BackingFormat = v
			return nil
		}},
		{"cluster_size", "size", "qcow2 cluster size (512 to 2M, a power of two)", func(o *createOptions, v string) error {
			n, err := parseSize(v)
			if err == nil && (n == 0 || n > 1<<30) {
				err = fmt.Errorf("%q: %w", v, qcow2.ErrInvalid)
			}
			o.qcow2.ClusterSize = int(n)
			return err
		}},
		{"compat", "str", "Compatibility level: only v3 (1.1) is supported", func(o *createOptions, v string) error {
			if err := requireValue(v, "1.1", "v3", "0.10", "v2"); err != nil {
				return err
			}
			o.compat = v // judged with compression_type once all are read
			return nil
		}},
		{"compression_type", "str", "Compression method used for compressed clusters (zlib or zstd)", func(o *createOptions, v string) error {
			switch v {
			case "zlib":
				o.qcow2.CompressionType = qcow2.CompressionZlib
			case "zstd":
				o.qcow2.CompressionType = qcow2.CompressionZstd
			default:
				return requireValue(v, "zlib", "zstd")
			}
			return nil
		}},
		{"extended_l2", "bool (on/off)", "Extended L2 tables: only off is supported", func(o *createOptions, v string) error {
			on, err := parseBool(v)
			if err == nil && on {
				err = fmt.Errorf("extended_l2=on: %w", qcow2.ErrUnsupported)
			}
			return err
		}},
		{"lazy_refcounts", "bool (on/off)", "Postpone refcount updates", func(o *createOptions, v string) error {
			on, err := parseBool(v)
			o.qcow2.LazyRefcounts = on
			return err
		}},
		preallocationOption(),
		{"refcount_bits", "num", "Width of a reference count entry in bits", func(o *createOptions, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n <= 0 {
				return fmt.Errorf("%q: %w", v, qcow2.ErrInvalid)
			}
			o.qcow2.RefcountBits = n
			return nil
		}},
		sizeOption(),
	}
}

func rawOptions() []option {
	return []option{preallocationOption(), sizeOption()}
}

func preallocationOption() option {
	return option{"preallocation", "str", "Preallocation mode: only off is supported", func(o *createOptions, v string) error {
		return requireValue(v, "off")
	}}
}

func sizeOption() option {
	return option{"size", "size", "Virtual disk size", func(o *createOptions, v string) error {
		n, err := parseSize(v)
		o.size, o.hasSize = n, true
		return err
	}}
}

func optionsFor(format string) []option {
	if format == formatRaw {
		return rawOptions()
	}
	return qcow2Options()
}

func requireValue(v string, allowed ...string) error {
	for _, a := range allowed {
		if v == a {
			return nil
		}
	}
	return fmt.Errorf("%q (supported: %s): %w", v, strings.Join(allowed, ", "), qcow2.ErrUnsupported)
}

// parseBool accepts QEMU's spellings of a boolean option.
func parseBool(v string) (bool, error) {
	switch v {
	case "on", "yes", "true", "y":
		return true, nil
	case "off", "no", "false", "n":
		return false, nil
	}
	return false, fmt.Errorf("%q is not on or off", v)
}

// checkFormat validates -f/-O for create and convert.
func checkFormat(f string) error {
	switch f {
	case formatQcow2, formatRaw:
		return nil
	}
	return fmt.Errorf("unknown file format '%s' (supported: qcow2, raw)", f)
}

// parseCreateOptions applies every -o argument, in order, for format.
// "help" or "?" as an option returns errOptionsHelp.
func parseCreateOptions(format string, args []string) (createOptions, error) {
	o := createOptions{format: format}
	known := optionsFor(format)
	for _, arg := range args {
		pairs, err := splitOptions(arg)
		if err != nil {
			return o, err
		}
		for _, kv := range pairs {
			if kv[0] == "help" || kv[0] == "?" {
				return o, errOptionsHelp
			}
			if err := applyOption(&o, known, kv[0], kv[1]); err != nil {
				return o, err
			}
		}
	}
	return o, o.checkCompat()
}

// checkCompat judges -o compat against the options that need v3, whatever
// their order, as qemu-img does: only v3 (compat=1.1) images are created,
// and a non-zlib compression type is refused first, in QEMU's words.
func (o *createOptions) checkCompat() error {
	if o.compat != "0.10" && o.compat != "v2" {
		return nil
	}
	if o.qcow2.CompressionType != qcow2.CompressionZlib {
		return fmt.Errorf("option compat=%s: non-zlib compression type (compression_type=%s) is only supported "+
			"with compatibility level 1.1 and above (use compat=1.1): %w",
			o.compat, compressionName(o.qcow2.CompressionType), qcow2.ErrInvalid)
	}
	return fmt.Errorf("option compat: %q (supported: 1.1, v3): %w", o.compat, qcow2.ErrUnsupported)
}

func applyOption(o *createOptions, known []option, key, value string) error {
	for _, opt := range known {
		if opt.key == key {
			if err := opt.apply(o, value); err != nil {
				return fmt.Errorf("option %s: %w", key, err)
			}
			return nil
		}
	}
	return fmt.Errorf("invalid parameter '%s' for format %s (see -o help)", key, o.format)
}

// splitOptions splits QEMU's "key=value,key=value" syntax, where ",," is a
// literal comma and a bare key means key=on.
func splitOptions(s string) ([][2]string, error) {
	var out [][2]string
	var cur strings.Builder
	flush := func() error {
		item := cur.String()
		cur.Reset()
		if item == "" {
			return fmt.Errorf("empty option in %q", s)
		}
		key, value, ok := strings.Cut(item, "=")
		if !ok {
			value = "on"
		}
		if key == "" {
			return fmt.Errorf("option without a name in %q", s)
		}
		out = append(out, [2]string{key, value})
		return nil
	}
	for i := 0; i < len(s); i++ {
		if s[i] != ',' {
			cur.WriteByte(s[i])
			continue
		}
		if i+1 < len(s) && s[i+1] == ',' {
			cur.WriteByte(',')
			i++
			continue
		}
		if err := flush(); err != nil {
			return nil, err
		}
	}
	if err := flush(); err != nil {
		return nil, err
	}
	return out, nil
}

// optionsHelp lists the -o options of format, like `qemu-img create -o help`.
func optionsHelp(format string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Supported %s options:\n", format)
	for _, opt := range optionsFor(format) {
		fmt.Fprintf(&b, "  %-22s - %s\n", opt.key+"=<"+opt.kind+">", opt.help)
	}
	return b.String()
}

// formattingLine is qemu-img create's "Formatting ..." line.
func (o createOptions) formattingLine(path string) string {
	if o.format == formatRaw {
		return fmt.Sprintf("Formatting '%s', fmt=raw size=%d", path, o.size)
	}
	q := o.qcow2
	var b strings.Builder
	fmt.Fprintf(&b, "Formatting '%s', fmt=qcow2 cluster_size=%d extended_l2=off compression_type=%s size=%d",
		path, orDefault(q.ClusterSize, 65536), compressionName(q.CompressionType), o.size)
	if q.BackingFile != "" {
		fmt.Fprintf(&b, " backing_file=%s", q.BackingFile)
	}
	if q.BackingFormat != "" {
		fmt.Fprintf(&b, " backing_fmt=%s", q.BackingFormat)
	}
	fmt.Fprintf(&b, " lazy_refcounts=%s refcount_bits=%d", onOff(q.LazyRefcounts), orDefault(q.RefcountBits, 16))
	return b.String()
}

func compressionName(t uint8) string {
	if t == qcow2.CompressionZstd {
		return "zstd"
	}
	return "zlib"
}

func orDefault(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}
