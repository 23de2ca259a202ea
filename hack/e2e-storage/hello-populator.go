//go:build ignore

// Command hello-populator (built by hack/k8s-build.sh e2e in its scratch
// module, as e2e_test.go is: its client-go imports stay out of our
// go.mod) stands in for registry.k8s.io/sig-storage/
// hello-populator in Kubernetes' storage e2e suite ("should provision
// storage with any volume data source"): the upstream image is built from
// kubernetes-csi/lib-volume-populator, which the Go module proxy here does
// not serve. It does what that populator does, in the same steps, for
// PVCs whose dataSourceRef is a hello.example.com Hello:
//
//  1. wait for the PVC's selected node (WaitForFirstConsumer), then make a
//     PVC' "prime-<uid>" in --namespace with the same class, size, mode
//     and selected node, and a pod "populate-<uid>" on that node that runs
//     this binary with --mode=populate on PVC', writing the Hello's
//     fileContents to /mnt/<fileName>;
//  2. once that pod succeeded, point the PV PVC' is bound to at the PVC
//     (claimRef, with its UID), so that the PV controller binds it there;
//  3. once the PVC is bound to it, delete the pod and PVC'.
//
// Every step is redone from what the API server shows, each round (2 s),
// so a restart loses nothing. --http-endpoint is accepted and unused.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
)

const (
	helloGroup      = "hello.example.com"
	helloKind       = "Hello"
	selectedNodeAnn = "volume.kubernetes.io/selected-node"
	mountPath       = "/mnt"
)

var helloGVR = schema.GroupVersionResource{Group: helloGroup, Version: "v1alpha1", Resource: "hellos"}

func main() {
	mode := flag.String("mode", "", "controller or populate")
	image := flag.String("image-name", "", "controller: the image of the populate pods (this one)")
	ns := flag.String("namespace", "hello", "controller: where PVC' and the populate pods go")
	flag.String("http-endpoint", "", "accepted for the upstream manifests; unused")
	fileName := flag.String("file-name", "", "populate: the file to write under "+mountPath)
	contents := flag.String("file-contents", "", "populate: what to write in it")
	klog.InitFlags(nil)
	flag.Parse()
	switch *mode {
	case "populate":
		if err := populate(*fileName, *contents); err != nil {
			fmt.Fprintln(os.Stderr, "hello-populator:", err)
			os.Exit(1)
		}
	case "controller":
		if *image == "" {
			fmt.Fprintln(os.Stderr, "hello-populator: --image-name is required with --mode=controller")
			os.Exit(2)
		}
		if err := runController(*ns, *image); err != nil {
			fmt.Fprintln(os.Stderr, "hello-populator:", err)
			os.Exit(1)
		}
	default:
		fmt.Fprintf(os.Stderr, "hello-populator: --mode=%q: want controller or populate\n", *mode)
		os.Exit(2)
	}
}

// populate writes the file and syncs it (the pod's end is the data's).
func populate(name, contents string) error {
	if name == "" || strings.Contains(name, "/") {
		return fmt.Errorf("--file-name=%q: want a plain file name", name)
	}
	f, err := os.Create(filepath.Join(mountPath, name))
	if err != nil {
		return err
	}
	if _, err := f.WriteString(contents); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

type controller struct {
	kube  kubernetes.Interface
	dyn   dynamic.Interface
	ns    string
	image string
}

func runController(ns, image string) error {
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return err
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	c := &controller{kube: kube, dyn: dyn, ns: ns, image: image}
	klog.InfoS("hello-populator controller", "namespace", ns, "image", image)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := c.round(ctx); err != nil {
			klog.ErrorS(err, "round")
		}
		cancel()
		time.Sleep(2 * time.Second)
	}
}

// round takes every PVC with a Hello as its data source one step on.
func (c *controller) round(ctx context.Context) error {
	pvcs, err := c.kube.CoreV1().PersistentVolumeClaims("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for i := range pvcs.Items {
		pvc := &pvcs.Items[i]
		ref := pvc.Spec.DataSourceRef
		if ref == nil || ref.APIGroup == nil || *ref.APIGroup != helloGroup || ref.Kind != helloKind || pvc.Namespace == c.ns {
			continue
		}
		if err := c.step(ctx, pvc); err != nil {
			klog.ErrorS(err, "populating", "pvc", klog.KObj(pvc))
		}
	}
	return nil
}

func (c *controller) step(ctx context.Context, pvc *corev1.PersistentVolumeClaim) error {
	primeName, podName := "prime-"+string(pvc.UID), "populate-"+string(pvc.UID)
	if pvc.Spec.VolumeName != "" {
		// Step 3: bound; PVC' and the pod are done with.
		return c.cleanup(ctx, primeName, podName)
	}
	hello, err := c.dyn.Resource(helloGVR).Namespace(pvc.Namespace).Get(ctx, pvc.Spec.DataSourceRef.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("hello %s/%s: %w", pvc.Namespace, pvc.Spec.DataSourceRef.Name, err)
	}
	fileName, _, _ := unstructured.NestedString(hello.Object, "spec", "fileName")
	contents, _, _ := unstructured.NestedString(hello.Object, "spec", "fileContents")
	if pvc.Spec.VolumeMode != nil && *pvc.Spec.VolumeMode == corev1.PersistentVolumeBlock {
		return fmt.Errorf("block volumes are not populated (a file needs a file system)")
	}
	node := pvc.Annotations[selectedNodeAnn]
	if pvc.Spec.StorageClassName == nil {
		return fmt.Errorf("no storage class")
	}
	sc, err := c.kube.StorageV1().StorageClasses().Get(ctx, *pvc.Spec.StorageClassName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if node == "" && sc.VolumeBindingMode != nil && *sc.VolumeBindingMode == storagev1.VolumeBindingWaitForFirstConsumer {
		return nil // the scheduler has not picked a node yet
	}
	prime, err := c.kube.CoreV1().PersistentVolumeClaims(c.ns).Get(ctx, primeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		prime = &corev1.PersistentVolumeClaim{
			ObjectMeta: metav1.ObjectMeta{Name: primeName, Namespace: c.ns},
			Spec: corev1.PersistentVolumeClaimSpec{
				AccessModes: pvc.Spec.AccessModes, Resources: pvc.Spec.Resources,
				StorageClassName: pvc.Spec.StorageClassName, VolumeMode: pvc.Spec.VolumeMode,
			},
		}
		if node != "" {
			prime.Annotations = map[string]string{selectedNodeAnn: node}
		}
		klog.InfoS("creating PVC'", "pvc", klog.KObj(pvc), "prime", primeName, "node", node)
		prime, err = c.kube.CoreV1().PersistentVolumeClaims(c.ns).Create(ctx, prime, metav1.CreateOptions{})
	}
	if err != nil {
		return err
	}
	pod, err := c.kube.CoreV1().Pods(c.ns).Get(ctx, podName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		pod = c.populatePod(podName, primeName, node, fileName, contents)
		klog.InfoS("creating populate pod", "pvc", klog.KObj(pvc), "pod", podName)
		_, err = c.kube.CoreV1().Pods(c.ns).Create(ctx, pod, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	switch pod.Status.Phase {
	case corev1.PodFailed:
		klog.InfoS("populate pod failed; starting it again", "pod", podName)
		return c.kube.CoreV1().Pods(c.ns).Delete(ctx, podName, metav1.DeleteOptions{})
	case corev1.PodSucceeded:
	default:
		return nil
	}
	// Step 2: the data is in PVC's PV: hand the PV to the PVC.
	if prime.Spec.VolumeName == "" {
		return nil
	}
	pv, err := c.kube.CoreV1().PersistentVolumes().Get(ctx, prime.Spec.VolumeName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if pv.Spec.ClaimRef != nil && pv.Spec.ClaimRef.UID == pvc.UID {
		return nil // handed over: the PV controller binds it
	}
	patch := fmt.Sprintf(`{"spec":{"claimRef":{"apiVersion":"v1","kind":"PersistentVolumeClaim","namespace":%q,"name":%q,"uid":%q,"resourceVersion":%q}}}`,
		pvc.Namespace, pvc.Name, pvc.UID, pvc.ResourceVersion)
	klog.InfoS("handing the PV over", "pv", pv.Name, "pvc", klog.KObj(pvc))
	_, err = c.kube.CoreV1().PersistentVolumes().Patch(ctx, pv.Name, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{})
	return err
}

func (c *controller) populatePod(name, claim, node, fileName, contents string) *corev1.Pod {
	vol := corev1.Volume{Name: "target", VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim}}}
	ctr := corev1.Container{
		Name: "populate", Image: c.image, ImagePullPolicy: corev1.PullIfNotPresent,
		Args:         []string{"--mode=populate", "--file-name=" + fileName, "--file-contents=" + contents},
		VolumeMounts: []corev1.VolumeMount{{Name: "target", MountPath: mountPath}},
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: c.ns},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyNever, NodeName: node,
			Containers: []corev1.Container{ctr}, Volumes: []corev1.Volume{vol},
		},
	}
}

func (c *controller) cleanup(ctx context.Context, primeName, podName string) error {
	err := c.kube.CoreV1().Pods(c.ns).Delete(ctx, podName, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	err = c.kube.CoreV1().PersistentVolumeClaims(c.ns).Delete(ctx, primeName, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return nil
}
