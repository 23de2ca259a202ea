package nbdattach

import (
	"slices"
	"testing"
	"testing/fstest"
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
