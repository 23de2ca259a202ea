package driver

import (
	"context"
	"errors"
	"fmt"
	"os"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
)

// kubeObjects is ClusterObjects over the API server, with the pod's
// service account (deploy/kubernetes/rbac-node.yaml grants list on
// persistentvolumes and volumesnapshotcontents). Both are read through
// client-go's dynamic client: the typed clientset links every API group's
// client and types in, which tripled the binary (23 to 74 MB) for four
// fields.
type kubeObjects struct {
	dyn    dynamic.Interface
	driver string
}

var _ ClusterObjects = (*kubeObjects)(nil)

var (
	persistentVolumes      = schema.GroupVersionResource{Version: "v1", Resource: "persistentvolumes"}
	volumeSnapshotContents = schema.GroupVersionResource{
		Group: "snapshot.storage.k8s.io", Version: "v1", Resource: "volumesnapshotcontents"}
)

// listPage is the page size of the listings; a listing is complete only
// when its last page says so (no continue token).
const listPage = 500

// newClusterObjects returns the cluster the orphan checker asks, or nil
// when it is not to run: --orphan-check=off, a mode without the
// controller service, or (auto) not in a cluster, which it says once.
// --orphan-check=on without in-cluster credentials is an error.
func newClusterObjects(opts Options) (ClusterObjects, error) {
	if opts.OrphanCheck == OrphanCheckOff || !opts.Mode.controller() {
		return nil, nil
	}
	cfg, err := rest.InClusterConfig()
	if err != nil {
		if opts.OrphanCheck == OrphanCheckOn {
			return nil, fmt.Errorf("--orphan-check=on: %w", err)
		}
		if os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
			klog.InfoS("Orphan check off: not running in a Kubernetes cluster (KUBERNETES_SERVICE_HOST is not set)")
		} else {
			klog.ErrorS(err, "Orphan check off: no in-cluster credentials")
		}
		return nil, nil
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	return &kubeObjects{dyn: dyn, driver: opts.DriverName}, nil
}

// VolumeHandles lists every PV, page by page, and keeps the handles of
// ours. An error on any page (an expired continue token included) fails
// the whole listing.
func (k *kubeObjects) VolumeHandles(ctx context.Context) (map[string]struct{}, error) {
	out := map[string]struct{}{}
	err := k.list(ctx, persistentVolumes, func(obj map[string]any) error {
		addVolumeHandle(out, obj, k.driver)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing PersistentVolumes: %w", err)
	}
	return out, nil
}

// list calls fn on every object of resource r, page by page; the listing
// is complete only when its last page says so (no continue token).
func (k *kubeObjects) list(ctx context.Context, r schema.GroupVersionResource, fn func(map[string]any) error) error {
	opts := metav1.ListOptions{Limit: listPage}
	for {
		l, err := k.dyn.Resource(r).List(ctx, opts)
		if err != nil {
			return err
		}
		for _, o := range l.Items {
			if err := fn(o.Object); err != nil {
				return fmt.Errorf("%s: %w", o.GetName(), err)
			}
		}
		if opts.Continue = l.GetContinue(); opts.Continue == "" {
			return nil
		}
	}
}

// addVolumeHandle adds the handle of a PV of driver's. Every PV counts,
// whatever its phase or reclaim policy: a Released or Failed PV still
// names its volume, and only its deletion makes the volume an orphan.
func addVolumeHandle(out map[string]struct{}, pv map[string]any, driver string) {
	d, _, _ := unstructured.NestedString(pv, "spec", "csi", "driver")
	h, _, _ := unstructured.NestedString(pv, "spec", "csi", "volumeHandle")
	if d == driver && h != "" {
		out[h] = struct{}{}
	}
}

// errSnapshotPending: a VolumeSnapshotContent of ours has no handle yet.
var errSnapshotPending = errors.New("a VolumeSnapshotContent of this driver has no snapshot handle yet")

// SnapshotHandles lists every VolumeSnapshotContent of ours: its
// status.snapshotHandle, or spec.source.snapshotHandle for a
// pre-provisioned one. A content of ours with neither is a CreateSnapshot
// in flight (or one whose answer the snapshotter has not recorded): the
// snapshot it will name may be in the data dir already, so the listing
// does not tell what is orphaned and fails.
func (k *kubeObjects) SnapshotHandles(ctx context.Context) (map[string]struct{}, error) {
	out := map[string]struct{}{}
	err := k.list(ctx, volumeSnapshotContents, func(obj map[string]any) error {
		return addSnapshotHandle(out, obj, k.driver)
	})
	if err != nil {
		return nil, fmt.Errorf("listing VolumeSnapshotContents: %w", err)
	}
	return out, nil
}

func addSnapshotHandle(out map[string]struct{}, obj map[string]any, driver string) error {
	if d, _, _ := unstructured.NestedString(obj, "spec", "driver"); d != driver {
		return nil
	}
	status, _, _ := unstructured.NestedString(obj, "status", "snapshotHandle")
	source, _, _ := unstructured.NestedString(obj, "spec", "source", "snapshotHandle")
	if status == "" && source == "" {
		return errSnapshotPending
	}
	for _, h := range []string{status, source} {
		if h != "" {
			out[h] = struct{}{}
		}
	}
	return nil
}
