// Command csi-qcow2 is the csi-qcow2 CSI driver and its node-side image tool.
//
// main only dispatches: `csi-qcow2 image ...` runs internal/imagecli;
// anything else is the CSI driver's flags (pkg/driver.Options), and runs it.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/csi-qcow2/csi-qcow2/internal/imagecli"
	"github.com/csi-qcow2/csi-qcow2/pkg/driver"
)

const usage = `Usage:
  csi-qcow2 image COMMAND [OPTIONS] ARGS...   manage qcow2/raw images (qemu-img subset)
  csi-qcow2 --endpoint=URL --node-id=ID --data-dir=DIR [FLAGS]   run the CSI driver

Image commands: create, info, check, resize, convert, serve, map.
Run 'csi-qcow2 image --help' or 'csi-qcow2 image COMMAND --help' for details.

Driver flags:
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string) int {
	switch {
	case len(args) > 0 && args[0] == "image":
		return imagecli.Run(ctx, args[1:], os.Stdout, os.Stderr)
	case len(args) == 1 && args[0] == "help":
		args = []string{"--help"}
	}
	return runDriver(ctx, args)
}

// runDriver parses the driver's flags into driver.Options and runs it.
func runDriver(ctx context.Context, args []string) int {
	opts := driver.DefaultOptions()
	fs := pflag.NewFlagSet("csi-qcow2", pflag.ContinueOnError)
	opts.AddFlags(fs)
	fs.SetOutput(os.Stdout)
	fs.Usage = func() { fmt.Print(usage); fs.PrintDefaults() }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(os.Stderr, "csi-qcow2: %v\n", err)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "csi-qcow2: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if err := opts.Validate(); err != nil {
		fmt.Fprintf(os.Stderr, "csi-qcow2: %v\n", err)
		return 2
	}
	if err := driver.Run(ctx, opts); err != nil {
		fmt.Fprintf(os.Stderr, "csi-qcow2: %v\n", err)
		return 1
	}
	return 0
}
