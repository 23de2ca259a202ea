// Package imagecli implements `csi-qcow2 image`: the subset of qemu-img that
// an operator needs on a node (create, info, check, resize, convert), with
// qemu-img's flags, output formats and exit codes, built on pkg/qcow2, and
// the part of qemu-nbd (serve, map) built on pkg/nbdattach.
package imagecli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/pflag"
)

// Prog prefixes every message, like qemu-img's "qemu-img: ".
const Prog = "csi-qcow2 image"

// streams are where a command writes; tests pass buffers.
type streams struct {
	stdout io.Writer
	stderr io.Writer
}

// subcommand is one `image` verb. flags registers its options on a fresh
// FlagSet bound to the receiver; run gets the positional arguments.
type subcommand interface {
	flags(fs *pflag.FlagSet)
	run(ctx context.Context, s streams, args []string) error
}

// spec describes a subcommand for dispatch and help.
type spec struct {
	name     string
	synopsis string // arguments after "csi-qcow2 image NAME"
	summary  string // one line for the command list
	help     string // paragraphs printed after the options
	// trailingSize marks commands whose last argument is a size that may
	// start with '-' (resize FILE -1G); it is set aside before flag parsing,
	// as qemu-img does.
	trailingSize bool
	new          func() subcommand
}

func specs() []spec {
	return []spec{createSpec(), infoSpec(), checkSpec(), resizeSpec(), convertSpec(), snapshotSpec(), serveSpec(), mapSpec(), extentsSpec()}
}

func lookup(name string) (spec, bool) {
	for _, sp := range specs() {
		if sp.name == name {
			return sp, true
		}
	}
	return spec{}, false
}

// Usage is the help for `csi-qcow2 image`.
func Usage() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Usage: %s COMMAND [OPTIONS] ARGS...\n\n", Prog)
	b.WriteString("Create, inspect, check, resize and convert qcow2 and raw disk images,\n")
	b.WriteString("serve them over NBD and attach them to /dev/nbdN. Flags, output and exit\n")
	b.WriteString("codes follow qemu-img (serve and map: qemu-nbd) for this subset.\n\nCommands:\n")
	for _, sp := range specs() {
		fmt.Fprintf(&b, "  %-8s %s\n", sp.name, sp.summary)
	}
	fmt.Fprintf(&b, "\nRun '%s COMMAND --help' for a command's options.\n", Prog)
	b.WriteString(sizeHelp)
	return b.String()
}

const sizeHelp = `
SIZE is a number of bytes, decimal or 0x-prefixed hex, with an optional
suffix K, M, G, T, P or E (powers of 1024; case-insensitive; "Ki"/"KiB"
spellings also accepted). A fraction needs a suffix: 1.5G.
`

func (sp spec) usage(fs *pflag.FlagSet) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Usage: %s %s %s\n\n%s\n", Prog, sp.name, sp.synopsis, sp.summary)
	if opts := fs.FlagUsages(); opts != "" {
		b.WriteString("\nOptions:\n")
		b.WriteString(opts)
	}
	if sp.help != "" {
		b.WriteString("\n")
		b.WriteString(sp.help)
	}
	return b.String()
}

// Run executes `csi-qcow2 image ARGS...` and returns the process exit code.
// It never panics on bad input and writes nothing to stdout on failure
// beyond what qemu-img would (check prints its report before failing).
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	s := streams{stdout: stdout, stderr: stderr}
	if len(args) == 0 {
		fmt.Fprint(stderr, Usage())
		return exitFailure
	}
	name := args[0]
	switch name {
	case "-h", "--help":
		fmt.Fprint(stdout, Usage())
		return exitOK
	case "help":
		return runHelp(s, args[1:])
	}
	sp, ok := lookup(name)
	if !ok {
		fmt.Fprintf(stderr, "%s: unknown command %q\n\n%s", Prog, name, Usage())
		return exitFailure
	}
	return sp.execute(ctx, s, args[1:])
}

func runHelp(s streams, args []string) int {
	if len(args) == 0 {
		fmt.Fprint(s.stdout, Usage())
		return exitOK
	}
	sp, ok := lookup(args[0])
	if !ok {
		fmt.Fprintf(s.stderr, "%s: unknown command %q\n\n%s", Prog, args[0], Usage())
		return exitFailure
	}
	fs := newFlagSet(sp.name)
	sp.new().flags(fs)
	fmt.Fprint(s.stdout, sp.usage(fs))
	return exitOK
}

func newFlagSet(name string) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.SortFlags = false
	return fs
}

func (sp spec) execute(ctx context.Context, s streams, args []string) int {
	cmd := sp.new()
	fs := newFlagSet(sp.name)
	cmd.flags(fs)
	var trailing []string
	if sp.trailingSize && len(args) > 0 && isNegativeNumber(args[len(args)-1]) {
		trailing = args[len(args)-1:]
		args = args[:len(args)-1]
	}
	err := fs.Parse(args)
	if err == nil {
		err = cmd.run(ctx, s, append(fs.Args(), trailing...))
	} else if errors.Is(err, pflag.ErrHelp) {
		err = errHelp
	} else {
		err = &usageError{msg: err.Error()}
	}
	return report(s, sp, fs, err)
}

// isNegativeNumber tells a size like "-1G" from an option like "-f".
func isNegativeNumber(arg string) bool {
	return len(arg) > 1 && arg[0] == '-' && (arg[1] >= '0' && arg[1] <= '9' || arg[1] == '.')
}

// report turns a command's error into output and an exit code; it is the
// one place where errors become exit statuses.
func report(s streams, sp spec, fs *pflag.FlagSet, err error) int {
	var usage *usageError
	var exit *exitError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, errHelp):
		fmt.Fprint(s.stdout, sp.usage(fs))
		return exitOK
	case errors.As(err, &usage):
		fmt.Fprintf(s.stderr, "%s %s: %s\n\n%s", Prog, sp.name, usage.msg, sp.usage(fs))
		return exitFailure
	case errors.As(err, &exit):
		if exit.err != nil {
			fmt.Fprintf(s.stderr, "%s: %v\n", Prog, exit.err)
		}
		return exit.code
	default:
		fmt.Fprintf(s.stderr, "%s: %v\n", Prog, err)
		return exitFailure
	}
}
