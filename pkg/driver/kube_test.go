package driver

import (
	"errors"
	"maps"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func TestAddVolumeHandle(t *testing.T) {
	pv := func(driver, handle string) *corev1.PersistentVolume {
		return &corev1.PersistentVolume{Spec: corev1.PersistentVolumeSpec{PersistentVolumeSource: corev1.PersistentVolumeSource{
			CSI: &corev1.CSIPersistentVolumeSource{Driver: driver, VolumeHandle: handle}}}}
	}
	out := map[string]struct{}{}
	for _, p := range []*corev1.PersistentVolume{
		pv(DefaultDriverName, "vol-a"),
		pv("other.csi.example.com", "vol-b"),
		pv(DefaultDriverName, ""),
		{Spec: corev1.PersistentVolumeSpec{PersistentVolumeSource: corev1.PersistentVolumeSource{
			HostPath: &corev1.HostPathVolumeSource{Path: "/x"}}}},
	} {
		addVolumeHandle(out, p, DefaultDriverName)
	}
	if got := slices.Sorted(maps.Keys(out)); !slices.Equal(got, []string{"vol-a"}) {
		t.Errorf("handles %v, want [vol-a]", got)
	}
}

func TestAddSnapshotHandle(t *testing.T) {
	vsc := func(driver, status, source string) map[string]any {
		spec := map[string]any{"driver": driver, "source": map[string]any{}}
		if source != "" {
			spec["source"] = map[string]any{"snapshotHandle": source}
		} else {
			spec["source"] = map[string]any{"volumeHandle": "vol-x"}
		}
		obj := map[string]any{"spec": spec}
		if status != "" {
			obj["status"] = map[string]any{"snapshotHandle": status, "readyToUse": true}
		}
		return obj
	}
	out := map[string]struct{}{}
	for _, o := range []map[string]any{
		vsc(DefaultDriverName, "snap-dynamic", ""),
		vsc(DefaultDriverName, "", "snap-preprovisioned"),
		vsc(DefaultDriverName, "snap-both", "snap-both"),
		vsc("other.csi.example.com", "snap-other", ""),
		vsc("other.csi.example.com", "", ""), // pending, but not ours
	} {
		if err := addSnapshotHandle(out, o, DefaultDriverName); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{"snap-both", "snap-dynamic", "snap-preprovisioned"}
	if got := slices.Sorted(maps.Keys(out)); !slices.Equal(got, want) {
		t.Errorf("handles %v, want %v", got, want)
	}
	// A content of ours without a handle: CreateSnapshot in flight, so the
	// listing cannot tell orphans.
	if err := addSnapshotHandle(out, vsc(DefaultDriverName, "", ""), DefaultDriverName); !errors.Is(err, errSnapshotPending) {
		t.Errorf("pending content: %v, want errSnapshotPending", err)
	}
}
