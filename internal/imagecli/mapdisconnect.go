package imagecli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"regexp"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
)

// deviceControl is the part of nbdattach's Attacher that `map -d` drives:
// an interface so that its choices (which devices it refuses, flush or no
// flush) are tested without root or an nbd module.
type deviceControl interface {
	connection(index int) (nbdattach.Connection, error)
	// disconnect flushes the device, then disconnects it: for a device
	// whose server is alive (a running map then exits 0).
	disconnect(ctx context.Context, index int) error
	// release disconnects without a flush: for one whose server is gone.
	release(ctx context.Context, index int) error
}

func newHostDeviceControl() (deviceControl, error) {
	a, err := nbdattach.NewAttacher(nbdattach.AttacherOptions{Interface: nbdattach.InterfaceAuto})
	if err != nil {
		return nil, err
	}
	return hostDeviceControl{a}, nil
}

type hostDeviceControl struct{ a *nbdattach.Attacher }

func (h hostDeviceControl) connection(index int) (nbdattach.Connection, error) {
	return h.a.Connection(index)
}
func (h hostDeviceControl) disconnect(ctx context.Context, index int) error {
	return h.a.Disconnect(ctx, index)
}
func (h hostDeviceControl) release(ctx context.Context, index int) error {
	return h.a.Release(ctx, index)
}

// owner is what can be told of the process that started a device.
type owner int

const (
	ownerUnknown owner = iota // this process cannot see the host's pids
	ownerAlive
	ownerGone // exited (or a zombie: its sockets are closed)
)

// driverVolume matches the backend identifier the CSI driver attaches its
// volumes with (pkg/driver's volume ids); map uses the image's path.
var driverVolume = regexp.MustCompile(`^vol-[0-9a-f]{32}$`)

// disconnectDevice is `map -d DEV`. Which kind of disconnect, and why:
//
//   - The device's pid file names the task that started it (a thread of
//     the attaching process; kill(2) takes it like a pid). If it is alive, it may be serving the device (a running map, or
//     qemu-nbd, nbd-client): flush, then disconnect, as qemu-nbd -d does; a
//     map serving it sees its sockets close and exits 0.
//   - If it has exited, the sockets died with it and nothing can serve the
//     device again (map never sets a dead-connection timeout): disconnect
//     it without a flush, which could only fail. This is the device a
//     SIGKILLed map leaves connected.
//   - Devices the CSI driver attached (backend vol-<id>) are refused: the
//     driver reconnects them after a restart, NodeUnstageVolume detaches
//     them, and a restarted driver releases the ones no staged record names.
//
// A mounted device is refused either way (nbdattach's O_EXCL open).
func (c *mapCmd) disconnectDevice(ctx context.Context, s streams, args []string) error {
	if len(args) != 0 || c.device != "" || c.readOnly || c.format != "" || c.connections != 0 {
		return usageErrorf("-d takes a device and nothing else (no FILE, --device, -r, -f or -c)")
	}
	index, err := parseNBD("-d", c.disconnect)
	if err != nil {
		return err
	}
	if index == nbdattach.AnyIndex {
		return usageErrorf("-d needs a device, /dev/nbdN")
	}
	k, err := c.newDeviceControl()
	if err != nil {
		return permissionHint(err)
	}
	dev := nbdattach.DevicePath(index)
	conn, err := k.connection(index)
	switch {
	case errors.Is(err, nbdattach.ErrNotFound):
		return fmt.Errorf("%s: no such nbd device (is the nbd module loaded?)", dev)
	case errors.Is(err, nbdattach.ErrNotConnected):
		return fmt.Errorf("%s is not connected: nothing to disconnect", dev)
	case err != nil:
		return permissionHint(err)
	}
	if driverVolume.MatchString(conn.Backend) {
		return fmt.Errorf("%s is attached by the csi-qcow2 driver (volume %s): map -d leaves it alone; NodeUnstageVolume detaches it, and the driver releases it at its start if no staged record names it", dev, conn.Backend)
	}
	switch c.processState(conn.PID) {
	case ownerGone:
		if err := k.release(ctx, index); err != nil {
			return permissionHint(err)
		}
		fmt.Fprintf(s.stderr, "%s: %s released: the process that attached it (task %d) is gone\n", Prog, dev, conn.PID)
		return nil
	case ownerAlive:
		if err := k.disconnect(ctx, index); err != nil {
			return permissionHint(fmt.Errorf("%w (task %d, which attached it, is running)", err, conn.PID))
		}
	default:
		if err := k.disconnect(ctx, index); err != nil {
			return permissionHint(fmt.Errorf("%w (this process cannot tell whether task %d, which attached it, is running: it is not in the host's pid namespace; run map -d there to release a device whose server is gone)", err, conn.PID))
		}
	}
	fmt.Fprintf(s.stderr, "%s: %s flushed and disconnected\n", Prog, dev)
	return nil
}

// permissionHint says what a permission error means here.
func permissionHint(err error) error {
	if errors.Is(err, fs.ErrPermission) {
		return fmt.Errorf("%w (disconnecting an nbd device needs root: CAP_SYS_ADMIN)", err)
	}
	return err
}

// hostProcessState judges pid, a task id as the initial pid namespace
// numbers it (/sys/block/nbdN/pid). Only a process in that namespace can
// look it up: elsewhere the same number is another process or none.
func hostProcessState(pid int) owner {
	if !inInitialPIDNamespace() {
		return ownerUnknown
	}
	switch err := unix.Kill(pid, 0); {
	case errors.Is(err, syscall.ESRCH):
		return ownerGone
	case err != nil && !errors.Is(err, syscall.EPERM):
		return ownerUnknown
	}
	if zombie(pid) {
		return ownerGone
	}
	return ownerAlive
}

// inInitialPIDNamespace: /proc/self/status's NSpid lists this process's
// pid in each namespace it is in, one field outside any nested one.
func inInitialPIDNamespace() bool {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "NSpid:"); ok {
			return len(strings.Fields(rest)) == 1
		}
	}
	return false // before Linux 4.1: cannot tell
}

// zombie: a process that exited and was not reaped still answers kill 0,
// but its sockets are closed.
func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	st := b[i+2]
	return st == 'Z' || st == 'X'
}
