//go:build !linux

package nbdattach

import (
	"errors"
	"fmt"
)

// SetIOFlusher reports that PR_SET_IO_FLUSHER is Linux's alone; elsewhere
// there is no /dev/nbdN of this host to deadlock on.
func SetIOFlusher() error {
	return fmt.Errorf("cannot mark the process PR_SET_IO_FLUSHER: %w", errors.ErrUnsupported)
}
