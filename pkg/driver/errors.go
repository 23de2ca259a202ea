package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Error kinds. Handlers and the store wrap these (see newError); toStatus
// turns them, and the errors of pkg/qcow2, pkg/nbdattach and the OS, into
// gRPC status codes. This file is the only place that knows codes.
var (
	errInvalid            = errors.New("invalid argument")
	errNotFound           = errors.New("not found")
	errAlreadyExists      = errors.New("already exists")
	errFailedPrecondition = errors.New("failed precondition")
	errOutOfRange         = errors.New("out of range")
	errBusy               = errors.New("an operation on this object is in progress")
	errExhausted          = errors.New("resource exhausted")
	errBadToken           = errors.New("invalid starting token")
	errPermission         = errors.New("permission denied")
	errUnavailable        = errors.New("unavailable")
)

// kindError carries a message and a kind; errors.Is(err, kind) holds.
type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.kind }

// newError returns an error of the given kind with a formatted message.
func newError(kind error, format string, args ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

// toStatus maps err to a gRPC status error. A status error passes through.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(codeOf(err), err.Error())
}

func codeOf(err error) codes.Code {
	switch {
	case errors.Is(err, errInvalid):
		return codes.InvalidArgument
	case errors.Is(err, errNotFound), errors.Is(err, qcow2.ErrSnapshotNotFound):
		return codes.NotFound
	case errors.Is(err, errAlreadyExists):
		return codes.AlreadyExists
	case errors.Is(err, errFailedPrecondition), errors.Is(err, nbdattach.ErrDeviceBusy):
		return codes.FailedPrecondition
	case errors.Is(err, errOutOfRange), errors.Is(err, qcow2.ErrShrink):
		return codes.OutOfRange
	case errors.Is(err, errBusy), errors.Is(err, errBadToken), errors.Is(err, qcow2.ErrSnapshotInUse):
		return codes.Aborted
	case errors.Is(err, errPermission):
		return codes.PermissionDenied
	case errors.Is(err, errUnavailable):
		return codes.Unavailable
	case errors.Is(err, errExhausted), errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return codes.ResourceExhausted
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, qcow2.ErrCorrupt), errors.Is(err, qcow2.ErrNotQcow2):
		return codes.DataLoss
	case errors.Is(err, fs.ErrNotExist):
		return codes.NotFound
	default:
		return codes.Internal
	}
}
