package driver

import (
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/klog/v2"
)

func TestOptionsValidateNBD(t *testing.T) {
	tests := []validateCase{
		{"defaults", func(*Options) {}, ""},
		{"io timeout off", func(o *Options) { o.NBDIOTimeout = 0 }, ""},
		{"several connections", func(o *Options) { o.NBDConnections = 4 }, ""},
		{"negative io timeout", func(o *Options) { o.NBDIOTimeout = -time.Second }, "must not be negative"},
		{"io timeout below a second", func(o *Options) { o.NBDIOTimeout = 500 * time.Millisecond }, "--nbd-io-timeout"},
		{"io timeout not in milliseconds", func(o *Options) { o.NBDIOTimeout = time.Second + time.Microsecond }, "--nbd-io-timeout"},
		{"negative connections", func(o *Options) { o.NBDConnections = -1 }, "must not be negative"},
	}
	runValidateCases(t, tests)
}

func TestOptionsValidateOrphans(t *testing.T) {
	runValidateCases(t, []validateCase{
		{"deleting after a day", func(o *Options) { o.DeleteOrphansAfter = 24 * time.Hour }, ""},
		{"off", func(o *Options) { o.OrphanCheck = OrphanCheckOff }, ""},
		{"on in node mode", func(o *Options) { o.OrphanCheck, o.Mode = OrphanCheckOn, ModeNode }, "--mode all or controller"},
		{"auto in node mode", func(o *Options) { o.Mode = ModeNode }, ""},
		{"unknown", func(o *Options) { o.OrphanCheck = "yes" }, "want auto, on or off"},
		{"no interval", func(o *Options) { o.OrphanCheckInterval = 0 }, "--orphan-check-interval"},
		{"delete with the check off", func(o *Options) { o.OrphanCheck, o.DeleteOrphansAfter = OrphanCheckOff, time.Hour }, "nothing would find orphans"},
		{"negative grace", func(o *Options) { o.OrphanGrace = -time.Second }, "must not be negative"},
		{"negative delete", func(o *Options) { o.DeleteOrphansAfter = -time.Second }, "must not be negative"},
		{"no grace, reporting only", func(o *Options) { o.OrphanGrace = 0 }, ""},
		{"no grace, deleting", func(o *Options) { o.OrphanGrace, o.DeleteOrphansAfter = 0, time.Hour }, "want at least 1m0s"},
	})
}

// TestNBDAttachOptions: no command timeout ever; the short request timer
// only for one-connection devices, where it cannot cut a live connection.
func TestNBDAttachOptions(t *testing.T) {
	for _, tc := range []struct {
		conns int
		want  time.Duration
	}{{1, 5 * time.Second}, {0, 0}, {2, 0}} {
		o := DefaultOptions()
		o.NBDConnections = tc.conns
		got := newNBDAttacher(o).attachOptions("vol-1", nil)
		if got.IOTimeout != tc.want || got.Timeout != 0 || got.Connections != tc.conns ||
			got.DeadConnTimeout != o.DeadConnTimeout || got.Identifier != "vol-1" {
			t.Errorf("%d connections: %+v, want IOTimeout %v and no Timeout", tc.conns, got, tc.want)
		}
		if err := got.Validate(); err != nil {
			t.Errorf("%d connections: %v", tc.conns, err)
		}
	}
}

// validateCase edits DefaultOptions (with a node ID and data dir) and
// names the error Validate must give, "" for none.
type validateCase struct {
	name    string
	edit    func(*Options)
	wantErr string
}

func runValidateCases(t *testing.T, tests []validateCase) {
	t.Helper()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := DefaultOptions()
			o.NodeID, o.DataDir = "n1", "/data"
			tc.edit(&o)
			err := o.Validate()
			if (err == nil) != (tc.wantErr == "") || (err != nil && !strings.Contains(err.Error(), tc.wantErr)) {
				t.Errorf("Validate = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// --v sets klog's verbosity: the V(n) lines were unreachable before the
// flag existed.
func TestFlagVerbosity(t *testing.T) {
	for _, args := range [][]string{{"--v=2"}, {"-v", "2"}} {
		fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
		o := DefaultOptions()
		o.AddFlags(fs)
		if klog.V(2).Enabled() {
			t.Fatal("V(2) enabled before --v")
		}
		if err := fs.Parse(args); err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		if !klog.V(2).Enabled() || klog.V(3).Enabled() {
			t.Errorf("%v: V(2) %v, V(3) %v; want true, false", args, klog.V(2).Enabled(), klog.V(3).Enabled())
		}
		if err := fs.Set("v", "0"); err != nil {
			t.Fatal(err)
		}
	}
}
