package imagecli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/net/netutil"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
)

func serveSpec() spec {
	return spec{
		name:     "serve",
		synopsis: "[-f FMT] [-r] [-k SOCKET | -b ADDR -p PORT] [-e N] [-x NAME] [-D TEXT] FILE",
		summary:  "Serve an image over NBD until SIGTERM or SIGINT, like qemu-nbd.",
		help: `Serves FILE (a qcow2 image with its backing chain, or a raw file) to NBD
clients on a unix socket (-k) or on TCP (127.0.0.1:10809 unless -b or -p
say otherwise). Once listening it prints the URI to connect to on stdout,
e.g. nbd+unix:///?socket=/run/vol.sock. It serves until SIGTERM or SIGINT,
then lets the requests in flight finish (at most 10 s), flushes the image,
closes it cleanly (a lazy-refcounts image gets its dirty bit cleared) and
exits 0. Unlike qemu-nbd without -t, it keeps serving when the last client
leaves.

Clients can FLUSH, write with FUA, TRIM (whole qcow2 clusters are freed and
punched out of the file at the next flush), WRITE_ZEROES and, unless -e is
1, open several connections (CAN_MULTI_CONN). At most -e clients are served
at once (default 1, as qemu-nbd; 0 means no limit); more wait in the listen
queue until one leaves.

The socket is created with mode 0600 and removed on exit. A socket left by
a server that is gone is replaced; any other existing file is an error.
This server has no authentication or encryption, so TCP addresses other
than loopback are refused unless --allow-remote is given.
`,
		new: func() subcommand { return &serveCmd{} },
	}
}

// Defaults of serve's TCP listener (qemu-nbd's port, loopback only).
const (
	defaultBind = "127.0.0.1"
	defaultPort = 10809
)

type serveCmd struct {
	format      string
	readOnly    bool
	socket      string
	bind        string
	port        int
	allowRemote bool
	shared      int
	name        string
	description string

	fs *pflag.FlagSet // to tell -k from -b/-p given explicitly
}

func (c *serveCmd) flags(fs *pflag.FlagSet) {
	c.fs = fs
	fs.StringVarP(&c.format, "format", "f", "", "image format: qcow2 or raw (default: probe)")
	fs.BoolVarP(&c.readOnly, "read-only", "r", false, "export read-only: writes, TRIM and WRITE_ZEROES fail with EPERM")
	fs.StringVarP(&c.socket, "socket", "k", "", "serve on this unix socket instead of TCP")
	fs.StringVarP(&c.bind, "bind", "b", defaultBind, "TCP address to listen on")
	fs.IntVarP(&c.port, "port", "p", defaultPort, "TCP port to listen on; 0 picks a free one")
	fs.BoolVar(&c.allowRemote, "allow-remote", false, "allow a TCP address other than loopback")
	fs.IntVarP(&c.shared, "shared", "e", 1, "serve at most N clients at once; 0 means no limit")
	fs.StringVarP(&c.name, "export-name", "x", "", "export name (clients asking for \"\" get it too)")
	fs.StringVarP(&c.description, "description", "D", "", "export description shown to clients")
}

func (c *serveCmd) validate(args []string) error {
	switch {
	case len(args) != 1:
		return usageErrorf("expected FILE, got %d arguments", len(args))
	case c.shared < 0:
		return usageErrorf("-e must be 0 or more, not %d", c.shared)
	case c.socket != "" && (c.fs.Changed("bind") || c.fs.Changed("port")):
		return usageErrorf("-k and -b/-p are mutually exclusive")
	case c.socket == "" && (c.port < 0 || c.port > 65535):
		return usageErrorf("-p must be a port from 0 to 65535, not %d", c.port)
	case c.socket == "" && !c.allowRemote && !isLoopback(c.bind):
		return usageErrorf("refusing to serve on %q: NBD has no authentication here; use a loopback address or --allow-remote", c.bind)
	}
	return nil
}

func (c *serveCmd) run(ctx context.Context, s streams, args []string) error {
	if err := c.validate(args); err != nil {
		return err
	}
	// Best effort: it matters only when a kernel client of this host
	// (nbd-client) is connected, and then this process runs as root.
	_ = nbdattach.SetIOFlusher()
	path := args[0]
	b, err := openBackend(path, c.format, c.readOnly)
	if err != nil {
		return err
	}
	stderr := &lockedWriter{w: s.stderr}
	e, err := nbdattach.NewExport(b, nbdattach.ExportOptions{
		Name: c.name, Description: c.description, ReadOnly: c.readOnly,
		NoMultiConn: c.shared == 1,
		OnConnError: func(err error) { fmt.Fprintf(stderr, "%s: %v\n", Prog, err) },
	})
	if err != nil {
		return errors.Join(err, b.Close())
	}
	l, uri, err := c.listen()
	if err != nil {
		return errors.Join(err, b.Close())
	}
	if c.shared > 0 {
		l = netutil.LimitListener(l, c.shared)
	}
	fmt.Fprintln(s.stdout, uri)
	err = e.Serve(ctx, l) // closes l, which removes the socket
	if cerr := b.Close(); cerr != nil {
		err = errors.Join(err, fmt.Errorf("closing '%s': %w", path, cerr))
	}
	return err
}

// listen opens the unix socket or the TCP listener and returns it with the
// URI clients connect to.
func (c *serveCmd) listen() (net.Listener, string, error) {
	if c.socket != "" {
		l, err := listenUnix(c.socket)
		if err != nil {
			return nil, "", err
		}
		return l, nbdUnixURI(c.socket, c.name), nil
	}
	l, err := net.Listen("tcp", net.JoinHostPort(c.bind, strconv.Itoa(c.port)))
	if err != nil {
		return nil, "", err
	}
	return l, (&url.URL{Scheme: "nbd", Host: l.Addr().String(), Path: "/" + c.name}).String(), nil
}

// nbdUnixURI is the NBD URI of export name on socket path, with the
// slashes of the path left as they are (RFC 3986 allows them in a query),
// as qemu-nbd and nbdkit print it.
func nbdUnixURI(path, name string) string {
	u := url.URL{Scheme: "nbd+unix", Path: "/" + name,
		RawQuery: "socket=" + strings.NewReplacer("%2F", "/", "+", "%20").Replace(url.QueryEscape(path))}
	return u.String()
}

// isLoopback reports whether host names a loopback address.
func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// listenUnix listens on a new unix socket at path with mode 0600. A socket
// that nobody listens on (left by a server that died) is replaced.
//
// The mode is set by the umask while the socket is bound, so that there is
// no moment at which others could connect; the umask is process-wide, which
// is harmless here, where nothing else creates files at the same time.
func listenUnix(path string) (net.Listener, error) {
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return err
	case fi.Mode().Type() != fs.ModeSocket:
		return fmt.Errorf("'%s' exists and is not a socket", path)
	}
	conn, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		conn.Close()
		return fmt.Errorf("'%s' is in use by another server", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("'%s' exists and cannot be checked: %w", path, err)
	}
	return os.Remove(path)
}

// lockedWriter serializes writes from concurrent connections.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
