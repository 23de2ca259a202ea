package imagecli

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
)

// fakeControl plays the kernel for map -d: one device's connection, and
// what was asked of it.
type fakeControl struct {
	conn    nbdattach.Connection
	connErr error
	opErr   error
	calls   []string
}

func (f *fakeControl) connection(index int) (nbdattach.Connection, error) {
	f.calls = append(f.calls, fmt.Sprintf("connection %d", index))
	return f.conn, f.connErr
}

func (f *fakeControl) disconnect(_ context.Context, index int) error {
	f.calls = append(f.calls, fmt.Sprintf("disconnect %d", index))
	return f.opErr
}

func (f *fakeControl) release(_ context.Context, index int) error {
	f.calls = append(f.calls, fmt.Sprintf("release %d", index))
	return f.opErr
}

func TestMapDisconnect(t *testing.T) {
	conn := nbdattach.Connection{Index: 3, PID: 4242, Backend: "/img/a.qcow2"}
	for _, tc := range []struct {
		name      string
		args      []string
		f         fakeControl
		state     owner
		code      int
		stderr    string
		wantCalls []string
	}{
		{name: "killed map: released without a flush", args: []string{"-d", "/dev/nbd3"}, f: fakeControl{conn: conn}, state: ownerGone,
			stderr: "/dev/nbd3 released: the process that attached it (task 4242) is gone", wantCalls: []string{"connection 3", "release 3"}},
		{name: "running server: flushed and disconnected", args: []string{"--disconnect", "/dev/nbd3"}, f: fakeControl{conn: conn}, state: ownerAlive,
			stderr: "/dev/nbd3 flushed and disconnected", wantCalls: []string{"connection 3", "disconnect 3"}},
		{name: "other pid namespace: flush first", args: []string{"-d", "/dev/nbd3"}, f: fakeControl{conn: conn}, state: ownerUnknown,
			stderr: "flushed and disconnected", wantCalls: []string{"connection 3", "disconnect 3"}},
		{name: "other pid namespace, dead server", args: []string{"-d", "/dev/nbd3"}, state: ownerUnknown,
			f:    fakeControl{conn: conn, opErr: errors.New("fsync /dev/nbd3: input/output error")},
			code: 1, stderr: "not in the host's pid namespace", wantCalls: []string{"connection 3", "disconnect 3"}},
		{name: "not connected", args: []string{"-d", "/dev/nbd3"}, f: fakeControl{connErr: fmt.Errorf("nbd3: %w", nbdattach.ErrNotConnected)},
			code: 1, stderr: "/dev/nbd3 is not connected: nothing to disconnect", wantCalls: []string{"connection 3"}},
		{name: "no such device", args: []string{"-d", "/dev/nbd99"}, f: fakeControl{connErr: fmt.Errorf("nbd99: %w", nbdattach.ErrNotFound)},
			code: 1, stderr: "/dev/nbd99: no such nbd device (is the nbd module loaded?)", wantCalls: []string{"connection 99"}},
		{name: "not an nbd device", args: []string{"-d", "/dev/sda"}, code: 1, stderr: "-d must be an nbd device, /dev/nbdN, not \"/dev/sda\""},
		{name: "with a file", args: []string{"-d", "/dev/nbd3", "x.qcow2"}, code: 1, stderr: "-d takes a device and nothing else"},
		{name: "with --device", args: []string{"-d", "/dev/nbd3", "--device", "/dev/nbd3"}, code: 1, stderr: "-d takes a device and nothing else"},
		{name: "driver's device", args: []string{"-d", "/dev/nbd3"}, state: ownerGone,
			f:    fakeControl{conn: nbdattach.Connection{Index: 3, PID: 1, Backend: "vol-0123456789abcdef0123456789abcdef"}},
			code: 1, stderr: "attached by the csi-qcow2 driver", wantCalls: []string{"connection 3"}},
		{name: "mounted", args: []string{"-d", "/dev/nbd3"}, state: ownerGone,
			f:    fakeControl{conn: conn, opErr: fmt.Errorf("/dev/nbd3 is mounted or held exclusively: %w", nbdattach.ErrDeviceBusy)},
			code: 1, stderr: "is mounted or held exclusively", wantCalls: []string{"connection 3", "release 3"}},
		{name: "not root", args: []string{"-d", "/dev/nbd3"}, state: ownerGone,
			f:    fakeControl{conn: conn, opErr: fmt.Errorf("opening /dev/nbd3: %w", fs.ErrPermission)},
			code: 1, stderr: "needs root", wantCalls: []string{"connection 3", "release 3"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.f
			sp := mapSpec()
			sp.new = func() subcommand {
				return &mapCmd{
					newAttacher:      func() (attacher, error) { t.Error("map -d attached"); return nil, errors.New("no") },
					newDeviceControl: func() (deviceControl, error) { return &f, nil },
					processState: func(pid int) owner {
						if pid != f.conn.PID {
							t.Errorf("asked about pid %d, want %d", pid, f.conn.PID)
						}
						return tc.state
					},
				}
			}
			out, errb := newLineBuffer(), newLineBuffer()
			code := sp.execute(context.Background(), streams{out, errb}, tc.args)
			if code != tc.code || !strings.Contains(errb.String(), tc.stderr) || out.String() != "" {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit %d, stderr with %q", code, out.String(), errb.String(), tc.code, tc.stderr)
			}
			if !slices.Equal(f.calls, tc.wantCalls) {
				t.Errorf("calls %q, want %q", f.calls, tc.wantCalls)
			}
		})
	}
}

// TestHostProcessState: this process is alive; a reaped child is gone.
func TestHostProcessState(t *testing.T) {
	if !inInitialPIDNamespace() {
		t.Skip("not in the initial pid namespace")
	}
	if got := hostProcessState(os.Getpid()); got != ownerAlive {
		t.Errorf("own pid: %v, want alive", got)
	}
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skip(err)
	}
	if got := hostProcessState(cmd.Process.Pid); got != ownerGone {
		t.Errorf("reaped child: %v, want gone", got)
	}
}
