package imagecli

import (
	"context"
	"fmt"
	"io"
	"math"
	"strings"

	"github.com/spf13/pflag"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// extents is qemu-img map under another name: "image map" is our attach
// command (like qemu-nbd -c), and "extents" says what is printed.
func extentsSpec() spec {
	return spec{
		name:     "extents",
		synopsis: "[-f qcow2] [--output=human|json] [-s START] [-l LENGTH] [--snapshot NAME] FILE",
		summary:  "List which ranges of a qcow2 image hold data, zeros or nothing, like qemu-img map.",
		help: `Each extent is a run of the guest disk that reads one way: its depth in the
backing chain (0 is FILE, 1 its backing file, ...), whether a layer
allocates it (present), whether it reads as zeros (zero), whether its
bytes are stored (data), and where in that layer's file (offset; none for
compressed clusters, which --output=human marks "compressed"). Unallocated
runs have the depth of the bottom of the chain, as in qemu-img map.
--output=json prints exactly qemu-img map --output=json's lines; the human
form lists every extent, where qemu-img's lists only stored data.
--snapshot lists an internal snapshot's disk (by id or name) instead.
A raw backing file is reported as data throughout (holes are not probed).

Example:
  csi-qcow2 image extents --output=json disk.qcow2
`,
		new: func() subcommand { return &extentsCmd{} },
	}
}

type extentsCmd struct {
	format   string
	output   string
	start    string
	length   string
	snapshot string
}

func (c *extentsCmd) flags(fs *pflag.FlagSet) {
	fs.StringVarP(&c.format, "format", "f", "", "image format: qcow2 (default: probe)")
	fs.StringVar(&c.output, "output", "human", "output format: human or json")
	fs.StringVarP(&c.start, "start-offset", "s", "0", "first guest byte to list")
	fs.StringVarP(&c.length, "max-length", "l", "", "list at most this many bytes (default: to the end)")
	fs.StringVar(&c.snapshot, "snapshot", "", "list an internal snapshot's disk (id or name)")
}

func (c *extentsCmd) run(_ context.Context, s streams, args []string) error {
	if err := checkOutput(c.output); err != nil {
		return err
	}
	if len(args) != 1 {
		return usageErrorf("expected FILE, got %d arguments", len(args))
	}
	start, length, err := c.window()
	if err != nil {
		return err
	}
	path := args[0]
	format, err := resolveFormat(path, c.format)
	if err != nil {
		return err
	}
	if format != formatQcow2 {
		return fmt.Errorf("'%s' is %s: extents lists qcow2 images", path, format)
	}
	img, err := openQcow2(path, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer img.Close()
	list := img.Extents
	if c.snapshot != "" {
		v, err := img.OpenSnapshot(c.snapshot)
		if err != nil {
			return fmt.Errorf("could not open snapshot '%s' of '%s': %w", c.snapshot, path, err)
		}
		defer v.Close()
		list = v.Extents
	}
	ext, err := list(start, length)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if c.output == "json" {
		return writeExtentsJSON(s.stdout, ext)
	}
	return writeExtentsHuman(s.stdout, ext)
}

func (c *extentsCmd) window() (start, length int64, err error) {
	if start, err = parseSize(c.start); err != nil {
		return 0, 0, fmt.Errorf("--start-offset: %w", err)
	}
	length = math.MaxInt64
	if c.length != "" {
		if length, err = parseSize(c.length); err != nil {
			return 0, 0, fmt.Errorf("--max-length: %w", err)
		}
	}
	return start, length, nil
}

// writeExtentsJSON prints qemu-img map --output=json's text: one object a
// line, in its key order, "offset" only where there is one.
func writeExtentsJSON(w io.Writer, ext []qcow2.Extent) error {
	return writeJSONLines(w, len(ext), func(b *strings.Builder, i int) {
		x := ext[i]
		fmt.Fprintf(b, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
			x.Start, x.Length, x.Depth, x.Present, x.Zero, x.Data)
		if x.Offset >= 0 {
			fmt.Fprintf(b, `, "offset": %d`, x.Offset)
		}
		b.WriteString("}")
	})
}

// writeJSONLines prints a JSON array of n objects, one a line, as qemu-img
// map --output=json lays it out; object writes the i-th.
func writeJSONLines(w io.Writer, n int, object func(b *strings.Builder, i int)) error {
	var b strings.Builder
	b.WriteString("[")
	for i := range n {
		if i > 0 {
			b.WriteString(",\n")
		}
		object(&b, i)
	}
	b.WriteString("]\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// writeExtentsHuman prints every extent in qemu-img map's columns, with
// the depth and a state where qemu-img prints the file name.
func writeExtentsHuman(w io.Writer, ext []qcow2.Extent) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%-16s%-16s%-16s%-7s%s\n", "Offset", "Length", "Mapped to", "Depth", "State")
	for _, x := range ext {
		mapped := "-"
		switch {
		case x.Offset >= 0:
			mapped = fmt.Sprintf("%#x", x.Offset)
		case x.Compressed:
			mapped = "compressed"
		}
		fmt.Fprintf(&b, "%-16s%-16s%-16s%-7d%s\n", fmt.Sprintf("%#x", x.Start), fmt.Sprintf("%#x", x.Length),
			mapped, x.Depth, extentState(x))
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func extentState(x qcow2.Extent) string {
	switch {
	case !x.Present:
		return "unallocated"
	case x.Compressed:
		return "data, compressed"
	case x.Data:
		return "data"
	case x.Offset >= 0:
		return "zero, allocated"
	}
	return "zero"
}
