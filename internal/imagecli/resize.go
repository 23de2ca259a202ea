package imagecli

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/pflag"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func resizeSpec() spec {
	return spec{
		name:         "resize",
		synopsis:     "[-f FMT] [--shrink] [-q] FILE [+|-]SIZE",
		summary:      "Change an image's virtual size to SIZE, or by +SIZE or -SIZE.",
		trailingSize: true,
		help: `Shrinking needs --shrink, as with qemu-img. A qcow2 image shrinks only if
no cluster is allocated past the new end (discard or zero it first); a raw
file is truncated. A negative SIZE may be given without "--".
` + sizeHelp,
		new: func() subcommand { return &resizeCmd{} },
	}
}

type resizeCmd struct {
	format string
	shrink bool
	quiet  bool
}

func (c *resizeCmd) flags(fs *pflag.FlagSet) {
	fs.StringVarP(&c.format, "format", "f", "", "image format: qcow2 or raw (default: probe)")
	fs.BoolVar(&c.shrink, "shrink", false, "allow the image to get smaller")
	fs.BoolVarP(&c.quiet, "quiet", "q", false, "do not print \"Image resized.\"")
}

// resizable is the part of an open image that resize uses.
type resizable interface {
	Size() int64
	Resize(size int64) error
	Close() error
}

func (c *resizeCmd) run(_ context.Context, s streams, args []string) error {
	if len(args) != 2 {
		return usageErrorf("expected FILE SIZE, got %d arguments", len(args))
	}
	path := args[0]
	img, err := openWritable(path, c.format)
	if err != nil {
		return err
	}
	err = c.resize(s, img, args[1])
	if cerr := img.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("closing '%s': %w", path, cerr)
	}
	if err != nil {
		return err
	}
	if !c.quiet {
		fmt.Fprintln(s.stdout, "Image resized.")
	}
	return nil
}

func (c *resizeCmd) resize(s streams, img resizable, arg string) error {
	size, err := parseResize(arg, img.Size())
	if err != nil {
		return err
	}
	if size <= 0 {
		return fmt.Errorf("new image size must be positive: %w", qcow2.ErrInvalid)
	}
	if size < img.Size() {
		if !c.shrink {
			return errors.New("use the --shrink option to perform a shrink operation")
		}
		fmt.Fprintf(s.stderr, "%s: warning: shrinking an image deletes all data beyond its new end\n", Prog)
	}
	if err := img.Resize(size); err != nil {
		return fmt.Errorf("resize to %d bytes: %w", size, err)
	}
	return nil
}

func openWritable(path, format string) (resizable, error) {
	format, err := resolveFormat(path, format)
	if err != nil {
		return nil, err
	}
	if format == formatRaw {
		d, err := openRaw(path, os.O_RDWR)
		if err != nil {
			return nil, err
		}
		return &rawResizer{d}, nil
	}
	return openQcow2(path, qcow2.OpenOptions{NoBacking: true})
}

// rawResizer resizes a raw image by truncating the file.
type rawResizer struct{ *rawDisk }

func (r *rawResizer) Resize(size int64) error {
	if err := r.Truncate(size); err != nil {
		return err
	}
	r.size = size
	return nil
}

func (r *rawResizer) Close() error {
	err := r.Sync()
	if cerr := r.File.Close(); err == nil {
		err = cerr
	}
	return err
}
