package imagecli

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/pflag"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func snapshotSpec() spec {
	return spec{
		name:     "snapshot",
		synopsis: "[-q] -c NAME | -l | -d NAME | -a NAME FILE\n       csi-qcow2 image snapshot --delta BASE [--output=human|json] TARGET FILE",
		summary:  "Create, list, delete, apply or compare internal snapshots of a qcow2 image.",
		help: `Exactly one of -c, -l, -d, -a and --delta. -d, -a and --delta take
snapshots' ids or names (an id matches first, as in qemu-img). -a reverts
the disk, virtual size included, to the snapshot, which is kept. -l prints
the table info prints. Names are unique, 1 to 65535 bytes; an image holds
at most 65536 snapshots.

--delta is csi-qcow2's own; qemu-img has no such option. It lists the
ranges of snapshot TARGET's disk that differ from snapshot BASE's, found
from the two snapshots' cluster tables (what the driver's CSI
SnapshotMetadata service streams): whole clusters, which include every
byte that differs and may include some rewritten with the bytes they had.
Each range says whether TARGET reads it as zeros. --output=json prints an
array of {"start", "length", "zero"} objects, in bytes, start and length
named as qemu-img map --output=json names them.

Examples:
  csi-qcow2 image snapshot -c before-upgrade disk.qcow2
  csi-qcow2 image snapshot --delta before-upgrade --output=json after-upgrade disk.qcow2
`,
		new: func() subcommand { return &snapshotCmd{} },
	}
}

type snapshotCmd struct {
	create, delete, apply string
	list, quiet           bool
	delta, output         string
}

func (c *snapshotCmd) flags(fs *pflag.FlagSet) {
	fs.StringVarP(&c.create, "create", "c", "", "create a snapshot named NAME")
	fs.BoolVarP(&c.list, "list", "l", false, "list the snapshots")
	fs.StringVarP(&c.delete, "delete", "d", "", "delete the snapshot with id or name NAME")
	fs.StringVarP(&c.apply, "apply", "a", "", "revert the disk to the snapshot with id or name NAME")
	fs.BoolVarP(&c.quiet, "quiet", "q", false, "quiet (snapshot prints nothing on success but for -l)")
	fs.StringVar(&c.delta, "delta", "", "list what snapshot TARGET changed since snapshot BASE (csi-qcow2's own, not qemu-img's)")
	fs.StringVar(&c.output, "output", "human", "--delta's output format: human or json")
}

func (c *snapshotCmd) run(_ context.Context, s streams, args []string) error {
	n := 0
	for _, set := range []bool{c.create != "", c.list, c.delete != "", c.apply != "", c.delta != ""} {
		if set {
			n++
		}
	}
	if n != 1 {
		return usageErrorf("give exactly one of -c, -l, -d, -a and --delta")
	}
	if c.delta != "" {
		return c.runDelta(s, args)
	}
	if c.output != "human" {
		return usageErrorf("--output goes with --delta")
	}
	if len(args) != 1 {
		return usageErrorf("expected FILE, got %d arguments", len(args))
	}
	path := args[0]
	if c.list {
		return listSnapshots(s, path)
	}
	img, err := openQcow2(path, qcow2.OpenOptions{NoBacking: true})
	if err != nil {
		return err
	}
	switch {
	case c.create != "":
		if _, err = img.CreateSnapshot(c.create); err != nil {
			err = fmt.Errorf("could not create snapshot '%s': %w", c.create, err)
		}
	case c.delete != "":
		if err = img.DeleteSnapshot(c.delete); err != nil {
			err = fmt.Errorf("could not delete snapshot '%s': %w", c.delete, err)
		}
	default:
		if err = img.RevertSnapshot(c.apply); err != nil {
			err = fmt.Errorf("could not apply snapshot '%s': %w", c.apply, err)
		}
	}
	if cerr := img.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("closing '%s': %w", path, cerr)
	}
	return err
}

func listSnapshots(s streams, path string) error {
	img, err := openQcow2(path, qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return err
	}
	defer img.Close()
	info := &imageInfo{}
	addQcow2Info(info, img.Info())
	var b strings.Builder
	writeSnapshotTable(&b, info.Snapshots) // nothing at all without snapshots, as qemu-img
	_, err = fmt.Fprint(s.stdout, b.String())
	return err
}

// snapshotDisk is a snapshot read through its view, as convert -l sees it.
type snapshotDisk struct {
	*qcow2.SnapshotView
	img *qcow2.Image
}

func (d *snapshotDisk) Close() error {
	err := d.SnapshotView.Close()
	if cerr := d.img.Close(); err == nil {
		err = cerr
	}
	return err
}

var _ disk = (*snapshotDisk)(nil)

// openSnapshotDisk opens snapshot NAME (an id or a name) of a qcow2 image.
func openSnapshotDisk(path, format, name string) (disk, error) {
	format, err := resolveFormat(path, format)
	if err != nil {
		return nil, err
	}
	if format != formatQcow2 {
		return nil, fmt.Errorf("'%s' is %s: only qcow2 images have snapshots", path, format)
	}
	img, err := openQcow2(path, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		return nil, err
	}
	v, err := img.OpenSnapshot(name)
	if err != nil {
		img.Close()
		return nil, fmt.Errorf("could not open snapshot '%s' of '%s': %w", name, path, err)
	}
	return &snapshotDisk{SnapshotView: v, img: img}, nil
}

// parseSnapshotParam reads convert's -l: "snapshot.name=NAME",
// "snapshot.id=ID" or a bare id or name, as qemu-img accepts.
func parseSnapshotParam(param string) (string, error) {
	if !strings.Contains(param, "=") {
		return param, nil
	}
	var id, name string
	for _, kv := range strings.Split(param, ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "snapshot.name":
			name = v
		case "snapshot.id":
			id = v
		default:
			return "", usageErrorf("-l: unknown snapshot parameter %q (want snapshot.name or snapshot.id)", k)
		}
	}
	if id != "" && name != "" {
		return "", usageErrorf("-l: give snapshot.name or snapshot.id, not both")
	}
	if id+name == "" {
		return "", usageErrorf("-l: empty snapshot name")
	}
	return id + name, nil
}
