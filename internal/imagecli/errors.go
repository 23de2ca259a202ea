package imagecli

import (
	"errors"
	"fmt"
)

// errHelp asks Run to print the command's help to stdout and exit 0.
var errHelp = errors.New("help requested")

// usageError is a mistake in the command line: Run prints it with the
// command's usage to stderr and exits 1.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usageErrorf(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// exitError carries an exit status other than 1, or a status whose message
// was already printed (err == nil). `image check` uses it for qemu-img's
// codes 2, 3 and 63.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// Exit statuses shared with qemu-img.
const (
	exitOK          = 0
	exitFailure     = 1  // could not do the job: bad usage, I/O error, check failed
	exitCorrupt     = 2  // check: corruptions remain
	exitLeaks       = 3  // check: only leaked clusters remain
	exitUnsupported = 63 // check: the format has no consistency check (raw)
)
