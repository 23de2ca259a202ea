package imagecli

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/spf13/pflag"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func createSpec() spec {
	return spec{
		name:     "create",
		synopsis: "[-f FMT] [-o OPTIONS] [-b BACKING -F BACKING_FMT] [-q] FILE [SIZE]",
		summary:  "Create a new image FILE of SIZE bytes.",
		help: `FILE must not exist: unlike qemu-img, create never overwrites a file.
A raw image is a sparse file. A qcow2 image is version 3 (compat 1.1).
SIZE may be omitted with -b: the backing file's size is used. A relative
BACKING is recorded as given and resolved from FILE's directory.

qcow2 -o options (see -o help): cluster_size, refcount_bits,
lazy_refcounts, compression_type (zlib or zstd: how convert -c compresses
clusters), backing_file, backing_fmt, size; compat=1.1, extended_l2=off and
preallocation=off are accepted.

Example:
  csi-qcow2 image create -f qcow2 -o cluster_size=64k,lazy_refcounts=on disk.qcow2 10G
  csi-qcow2 image create -f qcow2 -o compression_type=zstd disk.qcow2 10G
` + sizeHelp,
		new: func() subcommand { return &createCmd{} },
	}
}

type createCmd struct {
	format     string
	options    []string
	backing    string
	backingFmt string
	quiet      bool
}

func (c *createCmd) flags(fs *pflag.FlagSet) {
	fs.StringVarP(&c.format, "format", "f", formatQcow2, "image format: qcow2 or raw")
	fs.StringArrayVarP(&c.options, "options", "o", nil, "comma-separated format options, key=value (-o help lists them)")
	fs.StringVarP(&c.backing, "backing", "b", "", "backing file for unallocated clusters (qcow2 only)")
	fs.StringVarP(&c.backingFmt, "backing-format", "F", "", "format of the backing file: qcow2 or raw (required with -b)")
	fs.BoolVarP(&c.quiet, "quiet", "q", false, "do not print the Formatting line")
}

func (c *createCmd) run(_ context.Context, s streams, args []string) error {
	if err := checkFormat(c.format); err != nil {
		return err
	}
	o, err := parseCreateOptions(c.format, c.options)
	if errors.Is(err, errOptionsHelp) {
		fmt.Fprint(s.stdout, optionsHelp(c.format))
		return nil
	}
	if err != nil {
		return err
	}
	if len(args) < 1 || len(args) > 2 {
		return usageErrorf("expected FILE [SIZE], got %d arguments", len(args))
	}
	path := args[0]
	if len(args) == 2 {
		if o.size, err = parseSize(args[1]); err != nil {
			return err
		}
		o.hasSize = true
	}
	if err := c.applyBacking(path, &o); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("%s: %w (create never overwrites)", path, fs.ErrExist)
	}
	if !c.quiet {
		fmt.Fprintln(s.stdout, o.formattingLine(path))
	}
	if err := createImage(path, o); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// applyBacking merges -b/-F into o, checks that the backing file opens as
// the given format and takes the size from it when SIZE was not given.
// (qemu-img's -u is not offered: qcow2.Create requires the backing file.)
func (c *createCmd) applyBacking(path string, o *createOptions) error {
	if c.backing != "" {
		o.qcow2.BackingFile = c.backing
	}
	if c.backingFmt != "" {
		o.qcow2.BackingFormat = c.backingFmt
	}
	q := &o.qcow2
	switch {
	case q.BackingFile == "" && q.BackingFormat != "":
		return errors.New("backing format given without a backing file (-b)")
	case q.BackingFile == "" && !o.hasSize:
		return errors.New("image creation needs a size parameter")
	case q.BackingFile == "":
		return nil
	case o.format == formatRaw:
		return errors.New("raw images cannot have a backing file")
	case q.BackingFormat == "":
		return errors.New("backing file specified without backing format (-F qcow2|raw)")
	}
	size, err := backingSize(path, q.BackingFile, q.BackingFormat)
	if err != nil {
		return fmt.Errorf("could not open backing image: %w", err)
	}
	if !o.hasSize {
		o.size, o.hasSize = size, true
	}
	return nil
}

// backingSize opens the backing file of a new image at path, resolving a
// relative name from path's directory as the image will, and returns its
// virtual size.
func backingSize(path, backing, format string) (int64, error) {
	if !filepath.IsAbs(backing) {
		backing = filepath.Join(filepath.Dir(path), backing)
	}
	if err := checkFormat(format); err != nil {
		return 0, err
	}
	var d disk
	var err error
	if format == formatRaw {
		d, err = openRaw(backing, os.O_RDONLY)
	} else {
		d, err = openQcow2(backing, qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
	}
	if err != nil {
		return 0, err
	}
	defer d.Close()
	return d.Size(), nil
}

// createImage makes the file; on failure nothing is left at path.
func createImage(path string, o createOptions) error {
	if o.format == formatRaw {
		return createRaw(path, o.size)
	}
	opts := o.qcow2
	opts.Size = o.size
	img, err := qcow2.Create(absPath(path), opts)
	if err != nil {
		removeCreated(path, err)
		return err
	}
	if err := img.Close(); err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

// removeCreated removes a file that a failed create may have left, unless
// the failure was that the file already existed (then it is not ours).
func removeCreated(path string, err error) {
	if !errors.Is(err, fs.ErrExist) {
		os.Remove(path)
	}
}

// rawPerm is the mode of new raw files, matching qcow2.CreateOptions' default.
const rawPerm = 0o600

// createRaw makes a sparse raw file of size bytes.
func createRaw(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, rawPerm)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}
