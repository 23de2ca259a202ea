package nbdattach

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Reading nbd devices from sysfs. The functions take an fs.FS rooted at
// /sys/block so that tests can hand them an fstest.MapFS.
//
//	/sys/block/nbdN/pid      the task that started the device (the thread that
//	                         connected it, its id in the initial pid
//	                         namespace); present only while
//	                         the device is started (connected), and still
//	                         there after that process died
//	/sys/block/nbdN/size     capacity in 512-byte sectors
//	/sys/block/nbdN/backend  NBD_ATTR_BACKEND_IDENTIFIER (netlink, 5.x+)
//	/sys/block/nbdN/queue/io_timeout
//	                         the block request timer in milliseconds (5.0+;
//	                         written by hostBlockDevices.setIOTimeout)

// sysfsDevices lists the nbd devices; Connected means a pid file exists.
func sysfsDevices(sys fs.FS) ([]DeviceStatus, error) {
	entries, err := fs.ReadDir(sys, ".")
	if err != nil {
		return nil, fmt.Errorf("nbdattach: listing block devices: %w", err)
	}
	var devs []DeviceStatus
	for _, e := range entries {
		idx, ok := nbdIndex(e.Name())
		if !ok {
			continue
		}
		connected, err := sysfsConnected(sys, idx)
		if err != nil {
			return nil, err
		}
		devs = append(devs, DeviceStatus{Index: idx, Connected: connected})
	}
	sort.Slice(devs, func(i, j int) bool { return devs[i].Index < devs[j].Index })
	return devs, nil
}

// nbdIndex parses "nbd12" into 12.
func nbdIndex(name string) (int, bool) {
	digits, ok := strings.CutPrefix(name, "nbd")
	if !ok || digits == "" || (len(digits) > 1 && digits[0] == '0') {
		return 0, false
	}
	n, err := strconv.Atoi(digits)
	return n, err == nil && n >= 0
}

func sysfsConnected(sys fs.FS, index int) (bool, error) {
	_, err := fs.Stat(sys, fmt.Sprintf("nbd%d/pid", index))
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	}
	return false, fmt.Errorf("nbdattach: nbd%d: %w", index, err)
}

// sysfsSize returns the capacity of nbd device index in bytes.
func sysfsSize(sys fs.FS, index int) (int64, error) {
	s, err := sysfsRead(sys, index, "size")
	if err != nil {
		return 0, err
	}
	sectors, err := strconv.ParseInt(s, 10, 64)
	if err != nil || sectors < 0 || sectors > 1<<54 {
		return 0, fmt.Errorf("nbdattach: nbd%d/size %q: not a sector count", index, s)
	}
	return sectors * 512, nil
}

// sysfsIOTimeoutFile is the request timer's file under /sys/block/nbdN.
const sysfsIOTimeoutFile = "queue/io_timeout"

// sysfsIOTimeout returns the request timer of nbd device index.
func sysfsIOTimeout(sys fs.FS, index int) (time.Duration, error) {
	s, err := sysfsRead(sys, index, sysfsIOTimeoutFile)
	if err != nil {
		return 0, err
	}
	ms, err := strconv.ParseInt(s, 10, 64)
	if err != nil || ms <= 0 || ms > math.MaxInt64/int64(time.Millisecond) {
		return 0, fmt.Errorf("nbdattach: nbd%d/%s %q: not a count of milliseconds", index, sysfsIOTimeoutFile, s)
	}
	return time.Duration(ms) * time.Millisecond, nil
}

// sysfsPID returns the pid in nbdN/pid, or ErrNotConnected if the device is
// not started.
func sysfsPID(sys fs.FS, index int) (int, error) {
	s, err := sysfsRead(sys, index, "pid")
	if errors.Is(err, fs.ErrNotExist) {
		return 0, fmt.Errorf("nbdattach: nbd%d: %w", index, ErrNotConnected)
	}
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(s)
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("nbdattach: nbd%d/pid %q: not a pid", index, s)
	}
	return pid, nil
}

// sysfsBackend returns the backend identifier, "" if the device has none.
func sysfsBackend(sys fs.FS, index int) (string, error) {
	s, err := sysfsRead(sys, index, "backend")
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	return s, err
}

func sysfsRead(sys fs.FS, index int, name string) (string, error) {
	b, err := fs.ReadFile(sys, fmt.Sprintf("nbd%d/%s", index, name))
	if err != nil {
		return "", fmt.Errorf("nbdattach: reading nbd%d/%s: %w", index, name, err)
	}
	return strings.TrimSpace(string(b)), nil
}
