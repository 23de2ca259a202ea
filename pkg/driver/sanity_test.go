package driver

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/gomega"
)

// TestSanity runs csi-sanity v5.6.0 (the library form) against the driver:
// identity, controller and group controller (its specs run once
// GetPluginCapabilities offers GROUP_CONTROLLER_SERVICE; groups_test.go
// covers what they do not) over the real data dir code, the node service
// with FakeMounter and the fake attacher in place of mount(8) and
// /dev/nbdX, which the host lacks. The full suite on real devices runs in
// the qemu guest.
func TestSanity(t *testing.T) {
	if testing.Short() {
		t.Skip("csi-sanity takes a few seconds")
	}
	e := newTestEnv(t)
	dir := t.TempDir()
	cfg := sanity.NewTestConfig()
	cfg.Address = e.endpoint
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeSize = 16 << 20
	cfg.TestVolumeExpandSize = 32 << 20
	cfg.IdempotentCount = 2
	cfg.TestNodeVolumeAttachLimit = true
	cfg.CreateTargetDir = func(p string) (string, error) { return p, os.MkdirAll(p, 0o755) }
	cfg.CreateStagingDir = cfg.CreateTargetDir
	cfg.RemoveTargetPath = os.RemoveAll
	cfg.RemoveStagingPath = os.RemoveAll
	cfg.CheckPath = func(p string) (sanity.PathKind, error) {
		fi, err := os.Stat(p)
		switch {
		case os.IsNotExist(err):
			return sanity.PathIsNotFound, nil
		case err != nil:
			return sanity.PathIsOther, err
		case fi.IsDir():
			return sanity.PathIsDir, nil
		case fi.Mode().IsRegular():
			return sanity.PathIsFile, nil
		}
		return sanity.PathIsOther, nil
	}

	sc := sanity.GinkgoTest(&cfg)
	gomega.RegisterFailHandler(ginkgo.Fail)
	suite, reporter := ginkgo.GinkgoConfiguration()
	ginkgo.RunSpecs(t, "csi-sanity", suite, reporter)
	sc.Finalize()
}
