//go:build linux

package nbdattach

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// pfMemallocNoIO is the task flag PR_SET_IO_FLUSHER sets (include/linux/sched.h),
// visible as field 9 of /proc/PID/task/TID/stat.
const pfMemallocNoIO = 0x00080000

// TestSetIOFlusher: every thread of the process ends up flagged. Needs
// CAP_SYS_RESOURCE and Linux 5.6; skips otherwise. It leaves the test
// process flagged, which harms nothing.
func TestSetIOFlusher(t *testing.T) {
	err := SetIOFlusher()
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EINVAL) {
		t.Skipf("cannot set PR_SET_IO_FLUSHER here: %v", err)
	}
	if err != nil {
		// A cgo build marks one thread only and says so.
		t.Logf("SetIOFlusher: %v", err)
		return
	}
	tasks, err := filepath.Glob("/proc/self/task/*/stat")
	if err != nil || len(tasks) < 2 {
		t.Fatalf("threads: %v, %v", tasks, err)
	}
	for _, path := range tasks {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		// Fields after the ")" ending the command name: state is field 3,
		// flags field 9.
		fields := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		flags, err := strconv.ParseUint(fields[6], 10, 64)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if flags&pfMemallocNoIO == 0 {
			t.Errorf("thread %s has flags %#x, without PF_MEMALLOC_NOIO", path, flags)
		}
	}
}
