package nbdattach

import (
	"slices"
	"testing"
	"testing/fstest"
	"time"
)

func TestSysfs(t *testing.T) {
	sys := fstest.MapFS{
		"nbd0/size":    {Data: []byte("2048\n")},
		"nbd0/pid":     {Data: []byte("77\n")},
		"nbd0/backend": {Data: []byte("pvc-a\n")},
		"nbd1/size":    {Data: []byte("0\n")},
		"nbd10/size":   {Data: []byte("0\n")},
		"nbd2/size":    {Data: []byte("lots\n")},
		"nbd01/size":   {Data: []byte("0\n")}, // not a kernel name
		"nbdx/size":    {Data: []byte("0\n")},
		"loop0/size":   {Data: []byte("0\n")},
		"sda/size":     {Data: []byte("0\n")},
	}
	devs, err := sysfsDevices(sys)
	want := []DeviceStatus{{0, true}, {1, false}, {2, false}, {10, false}}
	if err != nil || !slices.Equal(devs, want) {
		t.Errorf("devices %v %v, want %v", devs, err, want)
	}
	if size, err := sysfsSize(sys, 0); err != nil || size != 2048*512 {
		t.Errorf("size %d %v", size, err)
	}
	if _, err := sysfsSize(sys, 2); err == nil {
		t.Errorf("size of %q parsed", "lots")
	}
	if _, err := sysfsSize(sys, 3); err == nil {
		t.Errorf("size of a missing device parsed")
	}
	if id, err := sysfsBackend(sys, 0); err != nil || id != "pvc-a" {
		t.Errorf("backend %q %v", id, err)
	}
	if id, err := sysfsBackend(sys, 1); err != nil || id != "" {
		t.Errorf("backend of a device without one: %q %v", id, err)
	}
}

func TestSysfsIOTimeout(t *testing.T) {
	sys := fstest.MapFS{
		"nbd0/queue/io_timeout": {Data: []byte("30000\n")},
		"nbd1/queue/io_timeout": {Data: []byte("5000")},
		"nbd2/queue/io_timeout": {Data: []byte("0\n")},
		"nbd3/queue/io_timeout": {Data: []byte("-1\n")},
		"nbd4/queue/io_timeout": {Data: []byte("99999999999999999999\n")},
		"nbd5/queue/io_timeout": {Data: []byte("soon\n")},
	}
	for _, tc := range []struct {
		index int
		want  time.Duration // 0: an error
	}{{0, 30 * time.Second}, {1, 5 * time.Second}, {2, 0}, {3, 0}, {4, 0}, {5, 0}, {6, 0}} {
		got, err := sysfsIOTimeout(sys, tc.index)
		if got != tc.want || (err != nil) != (tc.want == 0) {
			t.Errorf("nbd%d: %v, %v; want %v", tc.index, got, err, tc.want)
		}
	}
}
