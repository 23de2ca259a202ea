package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync/atomic"
	"testing"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
)

func TestAddVolumeHandle(t *testing.T) {
	pv := func(driver, handle string) map[string]any {
		return map[string]any{"spec": map[string]any{"csi": map[string]any{"driver": driver, "volumeHandle": handle}},
			"status": map[string]any{"phase": "Released"}}
	}
	out := map[string]struct{}{}
	for _, p := range []map[string]any{
		pv(DefaultDriverName, "vol-a"),
		pv("other.csi.example.com", "vol-b"),
		pv(DefaultDriverName, ""),
		{"spec": map[string]any{"hostPath": map[string]any{"path": "/x"}}},
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

// TestKubeObjectsPaging: the listings follow continue tokens to the last
// page, and a page that fails (here an expired token, 410 Gone) fails the
// whole listing instead of answering part of it.
func TestKubeObjectsPaging(t *testing.T) {
	pages := map[string]string{
		"": `{"kind":"PersistentVolumeList","apiVersion":"v1","metadata":{"continue":"p2"},"items":[
			{"kind":"PersistentVolume","apiVersion":"v1","metadata":{"name":"a"},"spec":{"csi":{"driver":"` + DefaultDriverName + `","volumeHandle":"vol-1"}}}]}`,
		"p2": `{"kind":"PersistentVolumeList","apiVersion":"v1","metadata":{},"items":[
			{"kind":"PersistentVolume","apiVersion":"v1","metadata":{"name":"b"},"spec":{"csi":{"driver":"` + DefaultDriverName + `","volumeHandle":"vol-2"}}}]}`,
	}
	var expired atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token := r.URL.Query().Get("continue")
		if r.URL.Path != "/api/v1/persistentvolumes" || r.URL.Query().Get("limit") != "500" {
			http.Error(w, "unexpected "+r.URL.String(), http.StatusBadRequest)
			return
		}
		if token != "" && expired.Load() {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusGone)
			fmt.Fprint(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Expired","code":410}`)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, pages[token])
	}))
	defer srv.Close()
	dyn, err := dynamic.NewForConfig(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	k := &kubeObjects{dyn: dyn, driver: DefaultDriverName}
	got, err := k.VolumeHandles(context.Background())
	if err != nil || !slices.Equal(slices.Sorted(maps.Keys(got)), []string{"vol-1", "vol-2"}) {
		t.Fatalf("VolumeHandles = %v, %v; want vol-1 and vol-2 from both pages", got, err)
	}
	expired.Store(true)
	if got, err := k.VolumeHandles(context.Background()); err == nil {
		t.Errorf("VolumeHandles with the second page gone = %v, want an error", got)
	}
}
