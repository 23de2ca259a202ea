package imagecli

import (
	"bytes"
	"context"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// lineBuffer is a stdout that tests read while the command writes to it;
// ready is closed at the first newline.
type lineBuffer struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	once  sync.Once
	ready chan struct{}
}

func newLineBuffer() *lineBuffer { return &lineBuffer{ready: make(chan struct{})} }

func (b *lineBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n, err := b.buf.Write(p)
	if bytes.IndexByte(b.buf.Bytes(), '\n') >= 0 {
		b.once.Do(func() { close(b.ready) })
	}
	return n, err
}

func (b *lineBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// running is a command run in the background until stop.
type running struct {
	cancel context.CancelFunc
	done   chan int
	stdout *lineBuffer
	stderr *lineBuffer
	line   string // the first line of stdout
}

// start runs `image ARGS...` in the background and waits for the first line
// of its stdout (serve's URI, map's device). If the command ends first, the
// test fails with its output.
func start(t *testing.T, args ...string) *running {
	t.Helper()
	return startWith(t, func(ctx context.Context, stdout, stderr io.Writer) int {
		return Run(ctx, args, stdout, stderr)
	}, args)
}

// startWith is start for a command run by run.
func startWith(t *testing.T, run func(ctx context.Context, stdout, stderr io.Writer) int, args []string) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan int, 1), stdout: newLineBuffer(), stderr: newLineBuffer()}
	go func() { r.done <- run(ctx, r.stdout, r.stderr) }()
	t.Cleanup(func() { r.stop(t) })
	select {
	case <-r.stdout.ready:
		r.line = strings.TrimSpace(r.stdout.String())
		return r
	case code := <-r.done:
		r.done <- code
		t.Fatalf("image %v exited %d before printing anything\nstderr:\n%s", args, code, r.stderr.String())
	case <-time.After(20 * time.Second):
		t.Fatalf("image %v printed nothing in 20 s\nstderr:\n%s", args, r.stderr.String())
	}
	return nil
}

// stop cancels the command as SIGTERM would and returns its result.
func (r *running) stop(t *testing.T) result {
	t.Helper()
	r.cancel()
	select {
	case code := <-r.done:
		r.done <- code
		return result{stdout: r.stdout.String(), stderr: r.stderr.String(), code: code}
	case <-time.After(30 * time.Second):
		t.Fatalf("still running 30 s after the signal\nstderr:\n%s", r.stderr.String())
	}
	return result{}
}

// lazyImage creates a lazy-refcounts qcow2 image, whose dirty bit is set
// while it is open for writing and cleared by a clean close.
func lazyImage(t *testing.T, size int64) string {
	t.Helper()
	path := tempPath(t, "disk.qcow2")
	newQcow2(t, path, qcow2.CreateOptions{Size: size, LazyRefcounts: true}, nil)
	return path
}

// dirtyBit reads the dirty bit of a qcow2 file's header.
func dirtyBit(t *testing.T, path string) bool {
	t.Helper()
	return readHeader(t, path).u64(72)&1 != 0
}

// greeting reads the first 8 bytes the server sends on a new connection
// ("NBDMAGIC"), or fails after wait.
func greeting(conn net.Conn, wait time.Duration) (string, error) {
	conn.SetReadDeadline(time.Now().Add(wait))
	b := make([]byte, 8)
	_, err := io.ReadFull(conn, b)
	return string(b), err
}

func TestServeUsageErrors(t *testing.T) {
	img := lazyImage(t, 1<<20)
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"serve"}, "expected FILE"},
		{[]string{"serve", img, img}, "expected FILE"},
		{[]string{"serve", "-e", "-1", img}, "-e must be 0 or more"},
		{[]string{"serve", "-k", "s", "-p", "1", img}, "mutually exclusive"},
		{[]string{"serve", "-k", "s", "--bind", "::1", img}, "mutually exclusive"},
		{[]string{"serve", "-p", "65536", img}, "-p must be a port"},
		{[]string{"serve", "-b", "0.0.0.0", img}, "refusing to serve on \"0.0.0.0\""},
		{[]string{"serve", "-b", "192.0.2.1", img}, "--allow-remote"},
		{[]string{"map", "--device", "/dev/sda", img}, "--device must be an nbd device, /dev/nbdN"},
		{[]string{"map", "--device", "/dev/nbd01", img}, "--device must be an nbd device, /dev/nbdN"},
		{[]string{"map", "-c", "-2", img}, "-c must be 0 or more"},
		{[]string{"map"}, "expected FILE"},
	} {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			runCLI(t, tt.args...).expect(t, 1, "", tt.want)
		})
	}
}

func TestServeErrors(t *testing.T) {
	dir := t.TempDir()
	img := lazyImage(t, 1<<20)
	notSocket := filepath.Join(dir, "file")
	mustWrite(t, notSocket, nil)
	runCLI(t, "serve", "-k", notSocket, img).expect(t, 1, "", "exists and is not a socket")
	runCLI(t, "serve", "-k", filepath.Join(dir, "s"), filepath.Join(dir, "missing")).expect(t, 1, "", "could not open")
	runCLI(t, "serve", "-f", "vmdk", "-k", filepath.Join(dir, "s"), img).expect(t, 1, "", "vmdk")

	live := start(t, "serve", "-k", filepath.Join(dir, "live.sock"), img)
	runCLI(t, "serve", "-k", filepath.Join(dir, "live.sock"), lazyImage(t, 1<<20)).expect(t, 1, "", "in use by another server")
	live.stop(t).expect(t, 0, "", "")
}

// TestServeUnixSocket: the socket is private, announced on stdout, removed
// on exit, and the image is closed cleanly.
func TestServeUnixSocket(t *testing.T) {
	img := lazyImage(t, 1<<20)
	sock := filepath.Join(t.TempDir(), "nbd sock") // a space, to be escaped
	r := start(t, "serve", "-k", sock, "-x", "vol", img)
	if want := "nbd+unix:///vol?socket=" + strings.ReplaceAll(sock, " ", "%20"); r.line != want {
		t.Errorf("printed %q, want %q", r.line, want)
	}
	fi, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want a socket with 0600", fi.Mode())
	}
	if !dirtyBit(t, img) {
		t.Errorf("dirty bit clear while the image is served")
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if g, err := greeting(conn, 10*time.Second); err != nil || g != "NBDMAGIC" {
		t.Fatalf("greeting %q, %v", g, err)
	}
	conn.Close()
	r.stop(t).expect(t, 0, "", "")
	if fileExists(sock) {
		t.Errorf("socket %s left behind", sock)
	}
	if dirtyBit(t, img) {
		t.Errorf("dirty bit set after serve exited")
	}
}

// TestServeReplacesStaleSocket: a socket nobody listens on is taken over.
func TestServeReplacesStaleSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	r := start(t, "serve", "-k", sock, lazyImage(t, 1<<20))
	r.stop(t).expect(t, 0, "", "")
}

// TestServeTCP: loopback by default, with the actual port in the URI.
func TestServeTCP(t *testing.T) {
	r := start(t, "serve", "--port", "0", lazyImage(t, 1<<20))
	addr, ok := strings.CutPrefix(r.line, "nbd://127.0.0.1:")
	if !ok || !strings.HasSuffix(addr, "/") {
		t.Fatalf("printed %q, want nbd://127.0.0.1:PORT/", r.line)
	}
	conn, err := net.Dial("tcp", strings.TrimSuffix(strings.TrimPrefix(r.line, "nbd://"), "/"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if g, err := greeting(conn, 10*time.Second); err != nil || g != "NBDMAGIC" {
		t.Fatalf("greeting %q, %v", g, err)
	}
	r.stop(t).expect(t, 0, "", "")
}

// TestServeSharedLimit: with -e 1 a second client waits, unanswered, until
// the first leaves (qemu-nbd's behaviour).
func TestServeSharedLimit(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	r := start(t, "serve", "-k", sock, "-e", "1", lazyImage(t, 1<<20))
	first, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := greeting(first, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	second, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	if g, err := greeting(second, 200*time.Millisecond); err == nil {
		t.Fatalf("second client greeted (%q) while the first is connected", g)
	}
	first.Close()
	if g, err := greeting(second, 10*time.Second); err != nil || g != "NBDMAGIC" {
		t.Fatalf("second client after the first left: %q, %v", g, err)
	}
	r.stop(t).expect(t, 0, "", "")
}

func TestRawBackend(t *testing.T) {
	path := tempPath(t, "disk.raw")
	mustWrite(t, path, bytes.Repeat([]byte{0xff}, 1<<20))
	b, err := openBackend(path, "", false)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := b.(*rawBackend); !ok || b.Size() != 1<<20 {
		t.Fatalf("opened %T of %d bytes", b, b.Size())
	}
	if _, err := b.WriteAt([]byte("hello"), 8192); err != nil {
		t.Fatal(err)
	}
	for _, op := range []func() error{
		func() error { return b.Discard(0, 4096) },
		func() error { return b.WriteZeroes(4096, 4096, false) },
		func() error { return b.WriteZeroes(65536, 65536, true) },
		b.Flush, b.Close,
	} {
		if err := op(); err != nil {
			t.Fatal(err)
		}
	}
	got := readImage(t, path)
	want := bytes.Repeat([]byte{0xff}, 1<<20)
	clear(want[:8192])
	copy(want[8192:], "hello")
	clear(want[65536:131072])
	if !bytes.Equal(got, want) {
		t.Fatal("raw file differs after discard, zeroes and write")
	}

	ro, err := openBackend(path, "raw", true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.WriteAt([]byte("x"), 0); err == nil {
		t.Error("write to a read-only raw backend succeeded")
	}
}
