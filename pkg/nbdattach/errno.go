package nbdattach

import (
	"errors"
	"syscall"
)

// Sentinel errors. Errors returned by this package wrap one of these (or an
// error from the connection or the backend) with context.
var (
	// ErrProtocol: the peer broke the protocol in a way that leaves no
	// choice but to drop the connection (bad magic, unknown client flags,
	// an option too large to read).
	ErrProtocol = errors.New("nbdattach: protocol violation")
	// ErrUnknownExport: NBD_OPT_EXPORT_NAME named an export this server
	// does not have; that option cannot be answered with an error, so the
	// connection is dropped.
	ErrUnknownExport = errors.New("nbdattach: unknown export")
	// ErrReadOnly is returned by a Backend (MemBackend, for one) asked to
	// write when it cannot; the client sees EPERM.
	ErrReadOnly = errors.New("nbdattach: read-only")
	// ErrOutOfRange is returned by a Backend asked to access bytes beyond
	// its size; the client sees EINVAL.
	ErrOutOfRange = errors.New("nbdattach: offset out of range")
	// ErrInvalidOptions: ExportOptions failed validation.
	ErrInvalidOptions = errors.New("nbdattach: invalid export options")
)

// errnoFor maps a Backend error to the error value of an NBD reply. The
// protocol allows only a few values; anything unrecognised becomes EIO.
//
// The spec says a server SHOULD NOT send EOVERFLOW (reserved for structured
// reads with NBD_CMD_FLAG_DF) nor ENOTSUP (reserved for fast zero), so a
// backend's EOVERFLOW is reported as EINVAL and ENOTSUP as EIO.
func errnoFor(err error) errno {
	switch {
	case err == nil:
		return errnoOK
	case errors.Is(err, ErrReadOnly),
		errors.Is(err, syscall.EPERM),
		errors.Is(err, syscall.EACCES),
		errors.Is(err, syscall.EROFS):
		return errnoPerm
	case errors.Is(err, syscall.ENOSPC),
		// The spec asks for EDQUOT and EFBIG to be reported as ENOSPC.
		errors.Is(err, syscall.EDQUOT),
		errors.Is(err, syscall.EFBIG):
		return errnoNoSpc
	case errors.Is(err, ErrOutOfRange),
		errors.Is(err, syscall.EINVAL),
		errors.Is(err, syscall.EOVERFLOW):
		return errnoInval
	case errors.Is(err, syscall.ENOMEM):
		return errnoNoMem
	case errors.Is(err, syscall.ESHUTDOWN):
		return errnoShutdown
	default:
		return errnoIO
	}
}
