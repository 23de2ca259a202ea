// Command csi-qcow2 is the csi-qcow2 CSI driver and its node-side image tool.
//
// main only dispatches: `csi-qcow2 image ...` runs internal/imagecli; the
// CSI driver (--endpoint, --node-id, --data-dir) is not implemented yet.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/csi-qcow2/csi-qcow2/internal/imagecli"
)

const usage = `Usage:
  csi-qcow2 image COMMAND [OPTIONS] ARGS...   manage qcow2/raw images (qemu-img subset)
  csi-qcow2 [--endpoint=URL --node-id=ID --data-dir=DIR]   run the CSI driver

Image commands: create, info, check, resize, convert, serve, map.
Run 'csi-qcow2 image --help' or 'csi-qcow2 image COMMAND --help' for details.

The CSI driver is coming in a later release; running it now exits with an error.
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
	case len(args) == 1 && (args[0] == "-h" || args[0] == "--help" || args[0] == "help"):
		fmt.Print(usage)
		return 0
	default:
		fmt.Fprint(os.Stderr, "csi-qcow2: the CSI driver is not implemented yet\n\n"+usage)
		return 1
	}
}
