package imagecli

import (
	"fmt"
	"io"
	"math"
	"strings"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// runDelta is `snapshot --delta BASE TARGET FILE`: the changed ranges
// between two internal snapshots, as qcow2.SnapshotDelta finds them.
func (c *snapshotCmd) runDelta(s streams, args []string) error {
	if err := checkOutput(c.output); err != nil {
		return err
	}
	if len(args) != 2 {
		return usageErrorf("--delta BASE takes TARGET FILE, got %d arguments", len(args))
	}
	target, path := args[0], args[1]
	img, err := openQcow2(path, qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return err
	}
	defer img.Close()
	changes, err := img.SnapshotDelta(c.delta, target, 0, math.MaxInt64)
	if err != nil {
		return fmt.Errorf("could not compare snapshot '%s' with '%s' in '%s': %w", target, c.delta, path, err)
	}
	if c.output == "json" {
		return writeChangesJSON(s.stdout, changes)
	}
	return writeChangesHuman(s.stdout, changes)
}

// writeChangesJSON prints one object a line, as qemu-img map
// --output=json prints its extents.
func writeChangesJSON(w io.Writer, changes []qcow2.Change) error {
	return writeJSONLines(w, len(changes), func(b *strings.Builder, i int) {
		x := changes[i]
		fmt.Fprintf(b, `{ "start": %d, "length": %d, "zero": %t}`, x.Start, x.Length, x.Zero)
	})
}

// writeChangesHuman prints the ranges in qemu-img map's columns and a
// total.
func writeChangesHuman(w io.Writer, changes []qcow2.Change) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%-16s%-16s%s\n", "Offset", "Length", "State")
	var total int64
	for _, x := range changes {
		state := "data"
		if x.Zero {
			state = "zero"
		}
		fmt.Fprintf(&b, "%-16s%-16s%s\n", fmt.Sprintf("%#x", x.Start), fmt.Sprintf("%#x", x.Length), state)
		total += x.Length
	}
	fmt.Fprintf(&b, "%d bytes changed in %d ranges\n", total, len(changes))
	_, err := io.WriteString(w, b.String())
	return err
}
