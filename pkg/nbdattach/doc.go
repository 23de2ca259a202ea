// Package nbdattach exports a disk image over the NBD protocol, from inside
// the driver process, and attaches it to a /dev/nbdX device.
//
// # The NBD server
//
// An Export serves one Backend (in production a *qcow2.Image; MemBackend
// for tests) to any number of connections at once:
//
//	e, err := nbdattach.NewExport(img, nbdattach.ExportOptions{Name: volID})
//	err = e.Serve(ctx, listener)             // accept, handshake, serve
//	err = e.ServeConn(ctx, conn)             // one connection, with handshake
//	err = e.ServeTransmission(ctx, conn)     // one kernel socket, no handshake
//	flags, size := e.Flags(), e.Size()       // what the kernel must be told
//
// The library returns errors and never logs; Serve hands the error that
// ended each connection to ExportOptions.OnConnError. A session that ends
// cleanly (NBD_OPT_ABORT, NBD_CMD_DISC, the client hanging up between
// messages, the context being done) returns nil. Errors wrap ErrProtocol,
// ErrUnknownExport or the underlying I/O error.
//
// Handshake (ServeConn, Serve): fixed newstyle only, with
// NBD_FLAG_NO_ZEROES. Options: NBD_OPT_GO and NBD_OPT_INFO (answering
// NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE always, NBD_INFO_NAME and
// NBD_INFO_DESCRIPTION when asked), NBD_OPT_EXPORT_NAME, NBD_OPT_LIST and
// NBD_OPT_ABORT. Everything else, STARTTLS and STRUCTURED_REPLY included,
// gets NBD_REP_ERR_UNSUP; an unknown export name gets NBD_REP_ERR_UNKNOWN
// (or a hang-up after EXPORT_NAME, which cannot carry an error); malformed
// INFO/GO/LIST data gets NBD_REP_ERR_INVALID. Option data is bounded at
// 16 KiB: a larger option is answered NBD_REP_ERR_TOO_BIG and the
// connection dropped, never read into memory. The name "" selects the
// export whatever its name.
//
// Transmission: simple replies only. Flags are HAS_FLAGS, SEND_FLUSH,
// CAN_MULTI_CONN (unless ExportOptions.NoMultiConn) and, unless read-only,
// SEND_FUA, SEND_TRIM and SEND_WRITE_ZEROES (READ_ONLY instead). FLUSH calls Backend.Flush; a
// command with NBD_CMD_FLAG_FUA is followed by Backend.Flush before its
// reply; TRIM calls Discard; WRITE_ZEROES calls WriteZeroes with mayUnmap
// unless NBD_CMD_FLAG_NO_HOLE. A backend answering errors.ErrUnsupported
// gets TRIM ignored (it is a hint) and WRITE_ZEROES done as writes. Block
// sizes advertised: minimum ExportOptions.MinBlockSize (default 1),
// preferred 4096, maximum MaxBlockSize (32 MiB).
//
// Each connection reads requests on one goroutine and runs each request on
// its own goroutine, at most ExportOptions.MaxInFlight (default 32) at once
// and at most 64 MiB of READ/WRITE buffers; replies go out whole, one at a
// time, under a write mutex, matched to requests by handle. A READ is read
// from the backend before anything is sent, so a failed read becomes an
// error reply. Every connection shares the one Backend, so a FLUSH on any
// of them makes every acknowledged write durable: that is what
// CAN_MULTI_CONN promises. NBD_CMD_DISC, a hang-up and ctx being done all
// end a connection the same way: stop reading, let the requests in flight
// finish and reply (for at most 10 s once ctx is done), flush the backend,
// close. Serve flushes once more after the last connection.
//
// Errors never drop the connection. Before the backend is called: unknown
// command (CACHE and BLOCK_STATUS included) or command flag, and DF or
// FAST_ZERO (never advertised), get EINVAL; WRITE, TRIM or WRITE_ZEROES on a
// read-only export EPERM; READ or WRITE over 32 MiB EINVAL (the payload of
// such a WRITE is skipped, not buffered); misaligned requests EINVAL; out of
// range requests ENOSPC for WRITE and WRITE_ZEROES, EINVAL for READ and
// TRIM, as the spec recommends (it reserves EOVERFLOW for DF reads, so this
// server never sends it). Backend errors map with errors.Is: EPERM, EACCES,
// EROFS and ErrReadOnly to EPERM; ENOSPC, EDQUOT and EFBIG to ENOSPC; EINVAL,
// EOVERFLOW and ErrOutOfRange to EINVAL; ENOMEM to ENOMEM; the rest, short
// reads and writes included, to EIO. A bad request magic, or a stream that
// ends inside a message, is the one thing that drops the connection: there
// is no way to find the next request.
//
// # What comes from github.com/pojntfx/go-nbd v0.3.2
//
// Nothing, in the code that ships. Its server is the wrong shape to build
// on: one request at a time per connection, READ/WRITE/DISC only, no
// FLUSH/FUA/TRIM/WRITE_ZEROES (so the kernel never sends a flush and fsync
// in a mounted filesystem never reaches the image), transmission flags
// that may be 0, EXPORT_NAME refused, a success header sent before the
// read so that a read error drops the connection, and unknown commands
// that drain Length bytes of payload TRIM and WRITE_ZEROES never send. Its
// protocol package would have been sound to reuse, but covers under half of
// the constants needed here (no FLUSH, TRIM, WRITE_ZEROES, command flags,
// NO_ZEROES, EXPORT_NAME, the error replies other than UNSUP and UNKNOWN)
// and its structs are meant for reflection-based encoding/binary, which the
// per-request path avoids; mixing two naming schemes for one wire format
// would be worse than writing the hundred lines. So protocol.go is our own,
// from the spec, and protocol_test.go uses go-nbd's protocol package as an
// independent transcription to cross-check every constant and header layout
// the two share. Its client (the ioctl attach) concerns the attach side.
//
// # Attaching to /dev/nbdX (Linux)
//
// An Attacher hands any Server (an *Export) to the kernel's nbd driver:
//
//	a, err := nbdattach.NewAttacher(nbdattach.AttacherOptions{})  // netlink, else ioctls
//	d, err := a.Attach(ctx, e, nbdattach.AttachOptions{Index: nbdattach.AnyIndex,
//		Connections: 4, DeadConnTimeout: time.Minute, Identifier: volID})
//	err = d.Resize(ctx, newSize)    // live; grow the filesystem afterwards
//	err = d.Reconfigure(ctx)        // new sockets for a live device
//	err = d.Detach(ctx)             // fsync, disconnect, wait until free
//	d, err = a.Reconnect(ctx, index, e, opts) // after a restart
//	n, err := a.FreeDevices(ctx)    // a.Devices, a.FindByIdentifier
//	c, err := a.Connection(index)   // who started a device, its identifier
//	err = a.Release(ctx, index)     // disconnect one whose server died
//
// Attach makes one AF_UNIX socketpair per connection (each becomes a
// blk-mq hardware queue; more than one needs FlagCanMultiConn), serves one
// end of each with ServeTransmission, starting before the kernel's
// partition scan can arrive, and passes the other ends to the kernel
// together with the size, a 4096-byte block size, the export's flags (so
// the kernel sends FLUSH and FUA) and the timeouts. The kernel is driven
// through the generic netlink family "nbd" (NBD_CMD_CONNECT, DISCONNECT,
// RECONFIGURE, STATUS) on a raw NETLINK_GENERIC socket, or, where that
// family is missing, through the ioctls (NBD_SET_BLKSIZE, SET_SIZE_BLOCKS,
// SET_FLAGS, SET_TIMEOUT, SET_SOCK, then NBD_DO_IT blocking on a goroutine
// locked to its thread with signals blocked, since a signal would tear the
// device down). Only netlink can hand a live device new sockets, set a
// dead-connection timeout or a backend identifier.
//
// Detach first fsyncs the device, which writes back its page cache and
// makes the kernel send NBD_CMD_FLUSH (a disconnect fails whatever is still
// queued), through a descriptor opened O_EXCL, so that a mounted device is
// refused with ErrDeviceBusy; if the flush fails the device stays attached.
// It then disconnects, waits for the sockets to be done, and for the kernel
// to report the device free, which it does only once nobody holds it open.
// Reconfigure retires each old socket
// by shutting down its sending side and waiting for the kernel to mark it
// dead (the kernel only replaces dead connections, and silently drops a
// socket it has no dead slot for); a dropped socket is detected because its
// peer is gone once our copy of the kernel end is closed, and is offered
// again. Reconnect does the same for a device whose server process died:
// with AttachOptions.DeadConnTimeout set, I/O issued meanwhile waits for it
// instead of failing, and the kernel refuses it if the Identifier differs.
// Release is for a device nobody will reconnect (its server was killed):
// it refuses a mounted one (the same O_EXCL open) and disconnects without
// the flush, which could only fail or wait for a server that is gone.
// The requests the dead server held are resent only when their timer
// fires; AttachOptions.IOTimeout shortens that timer for one-connection
// devices, the only ones whose live connections a timer never cuts.
//
// The Attacher keeps no state about devices; it reads them from the kernel
// (NBD_CMD_STATUS, or /sys/block/nbdN/pid for the ioctls, and
// /sys/block/nbdN/backend for identifiers). The kernel's control plane and
// the block device nodes sit behind two small interfaces so that unit
// tests drive the whole attach logic against a fake kernel over real
// sockets, without root; TestGuest exercises the real driver, through both
// interfaces, inside the VM of hack/vm (hack/vm/test-nbdattach.sh).
package nbdattach
