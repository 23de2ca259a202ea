package imagecli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/spf13/pflag"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func convertSpec() spec {
	return spec{
		name:     "convert",
		synopsis: "[-f FMT] [-l SNAPSHOT] [-c] [-O OUTPUT_FMT] [-o OPTIONS] [-q] SRC DST",
		summary:  "Copy image SRC into a new image DST, converting the format.",
		help: `DST must not exist: unlike qemu-img, convert never overwrites a file, and
on any failure (including Ctrl-C) the partial DST is removed.
The output is sparse: runs of zeros are not written (a raw DST gets holes,
a qcow2 DST leaves clusters unallocated). A qcow2 SRC is opened read-only
and read through its backing chain, so DST has no backing file.
OUTPUT_FMT defaults to raw, as in qemu-img; -o takes create's options
(see 'csi-qcow2 image create -o help').
-l reads an internal snapshot of a qcow2 SRC instead of its current disk:
snapshot.name=NAME, snapshot.id=ID or a bare id or name (id first); DST
gets the snapshot's virtual size.
-c compresses every cluster of a qcow2 DST that compression shrinks, as
qemu-img convert -c does, with DST's compression_type: zlib unless
-o compression_type=zstd.

Example:
  csi-qcow2 image convert -O qcow2 -o cluster_size=64k disk.raw disk.qcow2
  csi-qcow2 image convert -c -O qcow2 -o compression_type=zstd disk.raw disk.qcow2
`,
		new: func() subcommand { return &convertCmd{} },
	}
}

type convertCmd struct {
	snapshot  string
	compress  bool
	srcFormat string
	dstFormat string
	options   []string
	quiet     bool
}

func (c *convertCmd) flags(fs *pflag.FlagSet) {
	fs.StringVarP(&c.srcFormat, "format", "f", "", "SRC format: qcow2 or raw (default: probe)")
	fs.StringVarP(&c.snapshot, "snapshot", "l", "", "read SRC's internal snapshot (snapshot.name=NAME, snapshot.id=ID or NAME)")
	fs.BoolVarP(&c.compress, "compress", "c", false, "write DST's clusters compressed (qcow2 only)")
	fs.StringVarP(&c.dstFormat, "output-format", "O", formatRaw, "DST format: qcow2 or raw")
	fs.StringArrayVarP(&c.options, "options", "o", nil, "DST format options, as for create (-o help lists them)")
	fs.BoolVarP(&c.quiet, "quiet", "q", false, "quiet (convert prints nothing on success anyway)")
}

func (c *convertCmd) run(ctx context.Context, s streams, args []string) error {
	if err := checkFormat(c.dstFormat); err != nil {
		return err
	}
	o, err := parseCreateOptions(c.dstFormat, c.options)
	if errors.Is(err, errOptionsHelp) {
		fmt.Fprint(s.stdout, optionsHelp(c.dstFormat))
		return nil
	}
	if err != nil {
		return err
	}
	if len(args) != 2 {
		return usageErrorf("expected SRC DST, got %d arguments", len(args))
	}
	if o.hasSize || o.qcow2.BackingFile != "" || o.qcow2.BackingFormat != "" {
		return errors.New("convert takes the size from SRC and writes no backing file; drop size and backing_* from -o")
	}
	if c.compress && c.dstFormat != formatQcow2 {
		return usageErrorf("-c needs -O qcow2: %s images cannot be compressed", c.dstFormat)
	}
	src, dst := args[0], args[1]
	if _, err := os.Lstat(dst); err == nil {
		return fmt.Errorf("%s: %w (convert never overwrites)", dst, fs.ErrExist)
	}
	in, err := c.openSource(src)
	if err != nil {
		return err
	}
	defer in.Close()
	o.size = in.Size()
	o.compress = c.compress
	if err := convertTo(ctx, in, dst, o); err != nil {
		return fmt.Errorf("convert '%s' to '%s': %w", src, dst, err)
	}
	return nil
}

// openSource opens SRC, or its snapshot with -l.
func (c *convertCmd) openSource(src string) (disk, error) {
	if c.snapshot == "" {
		in, _, err := openDisk(src, c.srcFormat, false)
		return in, err
	}
	name, err := parseSnapshotParam(c.snapshot)
	if err != nil {
		return nil, err
	}
	return openSnapshotDisk(src, c.srcFormat, name)
}

// convertTo creates dst, copies in into it and makes it durable; on any
// error dst is removed.
func convertTo(ctx context.Context, in disk, dst string, o createOptions) error {
	out, block, err := createOutput(dst, o)
	if err != nil {
		removeCreated(dst, err)
		return err
	}
	err = copySparse(ctx, in, out, block)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
	}
	return err
}

// output is a new image being written. Close makes it durable.
type output interface {
	io.WriterAt
	Close() error
}

// createOutput creates dst and returns it with the block size below which
// zeros are still written (the cluster size for qcow2, where a partial
// cluster write allocates the whole cluster anyway).
func createOutput(dst string, o createOptions) (output, int64, error) {
	if o.format == formatRaw {
		f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, rawPerm)
		if err != nil {
			return nil, 0, err
		}
		out := &rawOutput{f}
		if err := f.Truncate(o.size); err != nil {
			out.Close()
			return nil, 0, err
		}
		return out, rawBlock, nil
	}
	opts := o.qcow2
	opts.Size = o.size
	img, err := qcow2.Create(dst, opts)
	if err != nil {
		return nil, 0, err
	}
	if o.compress {
		return &compressedOutput{qcow2Output{img}}, int64(img.Info().ClusterSize), nil
	}
	return &qcow2Output{img}, int64(img.Info().ClusterSize), nil
}

// rawBlock is the zero-detection granularity for raw output: the usual
// filesystem block size.
const rawBlock = 4096

type rawOutput struct{ *os.File }

func (r *rawOutput) Close() error {
	err := r.Sync()
	if cerr := r.File.Close(); err == nil {
		err = cerr
	}
	return err
}

type qcow2Output struct{ *qcow2.Image }

func (q *qcow2Output) Close() error {
	err := q.Flush()
	if cerr := q.Image.Close(); err == nil {
		err = cerr
	}
	return err
}

// compressedOutput writes whole clusters compressed. copySparse hands it
// runs of whole clusters (the block size is the cluster size), the last
// one possibly cut short by the end of the disk.
type compressedOutput struct{ qcow2Output }

func (c *compressedOutput) WriteAt(p []byte, off int64) (int, error) {
	cs := int64(c.Info().ClusterSize)
	for done := int64(0); done < int64(len(p)); done += cs {
		n := min(cs, int64(len(p))-done)
		if err := c.WriteCompressed(p[done:done+n], off+done); err != nil {
			return int(done), err
		}
	}
	return len(p), nil
}
