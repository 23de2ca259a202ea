package imagecli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func infoSpec() spec {
	return spec{
		name:     "info",
		synopsis: "[-f FMT] [--output=human|json] FILE",
		summary:  "Show an image's format, sizes, qcow2 features, snapshots and backing file.",
		help: `The image is opened read-only without its backing file, so info works
on dirty or corrupt-marked images. "disk size" is the host space the file
uses (st_blocks * 512). The JSON keys are qemu-img's.
`,
		new: func() subcommand { return &infoCmd{} },
	}
}

type infoCmd struct {
	format string
	output string
}

func (c *infoCmd) flags(fs *pflag.FlagSet) {
	fs.StringVarP(&c.format, "format", "f", "", "image format: qcow2 or raw (default: probe)")
	fs.StringVar(&c.output, "output", "human", "output format: human or json")
}

func (c *infoCmd) run(_ context.Context, s streams, args []string) error {
	if err := checkOutput(c.output); err != nil {
		return err
	}
	if len(args) != 1 {
		return usageErrorf("expected FILE, got %d arguments", len(args))
	}
	info, err := collectInfo(args[0], c.format)
	if err != nil {
		return err
	}
	if c.output == "json" {
		return writeJSON(s.stdout, info)
	}
	return writeInfoHuman(s.stdout, info)
}

func checkOutput(output string) error {
	if output != "human" && output != "json" {
		return usageErrorf("--output must be human or json, not %q", output)
	}
	return nil
}

// imageInfo is qemu-img's ImageInfo in its JSON field order.
type imageInfo struct {
	Snapshots             []snapshotInfo  `json:"snapshots,omitempty"`
	BackingFilenameFormat string          `json:"backing-filename-format,omitempty"`
	VirtualSize           int64           `json:"virtual-size"`
	Filename              string          `json:"filename"`
	ClusterSize           int             `json:"cluster-size,omitempty"`
	Format                string          `json:"format"`
	ActualSize            *int64          `json:"actual-size,omitempty"`
	FormatSpecific        *formatSpecific `json:"format-specific,omitempty"`
	FullBackingFilename   string          `json:"full-backing-filename,omitempty"`
	BackingFilename       string          `json:"backing-filename,omitempty"`
	DirtyFlag             bool            `json:"dirty-flag"`
}

type formatSpecific struct {
	Type string        `json:"type"`
	Data qcow2Specific `json:"data"`
}

// qcow2Specific is ImageInfoSpecificQCow2; v2 images have only compat,
// compression type and refcount bits.
type qcow2Specific struct {
	Compat          string `json:"compat"`
	CompressionType string `json:"compression-type"`
	LazyRefcounts   *bool  `json:"lazy-refcounts,omitempty"`
	RefcountBits    int    `json:"refcount-bits"`
	Corrupt         *bool  `json:"corrupt,omitempty"`
	ExtendedL2      *bool  `json:"extended-l2,omitempty"`
}

type snapshotInfo struct {
	VMClockNsec int64  `json:"vm-clock-nsec"`
	Name        string `json:"name"`
	DateSec     int64  `json:"date-sec"`
	DateNsec    int64  `json:"date-nsec"`
	VMClockSec  int64  `json:"vm-clock-sec"`
	ID          string `json:"id"`
	VMStateSize uint64 `json:"vm-state-size"`
	date        time.Time
	vmClock     time.Duration
}

func collectInfo(path, format string) (*imageInfo, error) {
	d, format, err := openDisk(path, format, true)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	info := &imageInfo{Filename: path, Format: format, VirtualSize: d.Size()}
	if n, ok := diskUsage(path); ok {
		info.ActualSize = &n
	}
	if img, ok := d.(*qcow2.Image); ok {
		addQcow2Info(info, img.Info())
	}
	return info, nil
}

func addQcow2Info(info *imageInfo, qi qcow2.Info) {
	info.VirtualSize = qi.VirtualSize
	info.ClusterSize = qi.ClusterSize
	info.DirtyFlag = qi.Dirty
	spec := qcow2Specific{Compat: qi.Compat, CompressionType: qi.CompressionType, RefcountBits: qi.RefcountBits}
	if qi.Version >= 3 {
		lazy, corrupt, extL2 := qi.LazyRefcounts, qi.Corrupt, false
		spec.LazyRefcounts, spec.Corrupt, spec.ExtendedL2 = &lazy, &corrupt, &extL2
	}
	info.FormatSpecific = &formatSpecific{Type: formatQcow2, Data: spec}
	if qi.BackingFile != "" {
		info.BackingFilename = qi.BackingFile
		info.FullBackingFilename = fullBackingName(info.Filename, qi.BackingFile)
		info.BackingFilenameFormat = qi.BackingFormat
	}
	for _, sn := range qi.Snapshots {
		info.Snapshots = append(info.Snapshots, snapshotInfo{
			ID: sn.ID, Name: sn.Name,
			DateSec: sn.Date.Unix(), DateNsec: int64(sn.Date.Nanosecond()),
			VMClockSec: int64(sn.VMClock / time.Second), VMClockNsec: int64(sn.VMClock % time.Second),
			VMStateSize: sn.VMStateSize,
			date:        sn.Date, vmClock: sn.VMClock,
		})
	}
}

// fullBackingName resolves a relative backing name against the image's
// directory by plain concatenation, as QEMU's path_combine does.
func fullBackingName(image, backing string) string {
	if strings.HasPrefix(backing, "/") {
		return backing
	}
	i := strings.LastIndexByte(image, '/')
	if i < 0 {
		return backing
	}
	return image[:i+1] + backing
}

func writeInfoHuman(w io.Writer, info *imageInfo) error {
	var b strings.Builder
	disk := "unavailable"
	if info.ActualSize != nil {
		disk = formatSize(*info.ActualSize)
	}
	fmt.Fprintf(&b, "image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\ndisk size: %s\n",
		info.Filename, info.Format, formatSize(info.VirtualSize), info.VirtualSize, disk)
	if info.ClusterSize != 0 {
		fmt.Fprintf(&b, "cluster_size: %d\n", info.ClusterSize)
	}
	if info.DirtyFlag {
		b.WriteString("cleanly shut down: no\n")
	}
	if info.BackingFilename != "" {
		fmt.Fprintf(&b, "backing file: %s", info.BackingFilename)
		if info.FullBackingFilename != info.BackingFilename {
			fmt.Fprintf(&b, " (actual path: %s)", info.FullBackingFilename)
		}
		b.WriteString("\n")
		if info.BackingFilenameFormat != "" {
			fmt.Fprintf(&b, "backing file format: %s\n", info.BackingFilenameFormat)
		}
	}
	writeSnapshotTable(&b, info.Snapshots)
	if fs := info.FormatSpecific; fs != nil {
		b.WriteString("Format specific information:\n")
		d := fs.Data
		fmt.Fprintf(&b, "    compat: %s\n    compression type: %s\n", d.Compat, d.CompressionType)
		if d.LazyRefcounts != nil {
			fmt.Fprintf(&b, "    lazy refcounts: %t\n", *d.LazyRefcounts)
		}
		fmt.Fprintf(&b, "    refcount bits: %d\n", d.RefcountBits)
		if d.Corrupt != nil {
			fmt.Fprintf(&b, "    corrupt: %t\n", *d.Corrupt)
		}
		if d.ExtendedL2 != nil {
			fmt.Fprintf(&b, "    extended l2: %t\n", *d.ExtendedL2)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeSnapshotTable prints QEMU's bdrv_snapshot_dump table. pkg/qcow2 does
// not report the instruction count, so ICOUNT is left blank as QEMU does
// for snapshots without one.
func writeSnapshotTable(b *strings.Builder, snaps []snapshotInfo) {
	if len(snaps) == 0 {
		return
	}
	b.WriteString("Snapshot list:\n")
	fmt.Fprintf(b, "%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
	for _, sn := range snaps {
		secs := int64(sn.vmClock / time.Second)
		clock := fmt.Sprintf("%02d:%02d:%02d.%03d", secs/3600, secs/60%60, secs%60, int64(sn.vmClock/time.Millisecond)%1000)
		date := sn.date.Local().Format("2006-01-02 15:04:05")
		fmt.Fprintf(b, "%-9s %-16s %8s%20s%13s%11s\n", sn.ID, sn.Name, formatSize(int64(sn.VMStateSize)), date, clock, "")
	}
}
