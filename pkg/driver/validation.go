package driver

import (
	"sort"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// Capacity: sizes are rounded up to a multiple of 1 MiB; a request with no
// capacity range gets 1 GiB.
const (
	capacityUnit    int64 = 1 << 20
	defaultCapacity int64 = 1 << 30
	// maxCapacity bounds an image at 64 TiB.
	maxCapacity int64 = 64 << 40
	maxNameLen        = 128 * 1024 // the CSI spec bounds strings at 128 KiB
)

// StorageClass parameters.
const (
	paramFSType        = "csi.storage.k8s.io/fstype"
	paramClusterSize   = "clusterSize"
	paramLazyRefcounts = "lazyRefcounts"
	// paramCrossNodeRestore=true lets a volume be restored or cloned from
	// a source on another node, copied over the network (crossnode.go).
	paramCrossNodeRestore = "crossNodeRestore"
	// sidecarPrefix: keys the external-provisioner and -snapshotter add
	// (pvc/name, pvc/namespace, pv/name, volumesnapshot/name, ...).
	sidecarPrefix = "csi.storage.k8s.io/"
)

// createParams are the parameters that shape a volume; two CreateVolume
// calls with the same name must agree on them.
type createParams struct {
	FSType        string `json:"fsType"`
	ClusterSize   int    `json:"clusterSize,omitempty"`
	LazyRefcounts bool   `json:"lazyRefcounts,omitempty"`
}

// parseCreateParams validates StorageClass parameters. Unknown keys are
// refused by name; csi.storage.k8s.io/ keys other than fstype are accepted
// and ignored.
//
// Lazy refcounts are on unless refused: a staged volume's write must be in
// the image file before it is acknowledged (servedImage), and only with
// lazy refcounts does a write over unallocated or zero clusters get there
// without an fdatasync (qcow2's lazylink.go). The image is then repaired
// on the next writable open after a crash, in milliseconds.
func parseCreateParams(params map[string]string) (createParams, error) {
	p := createParams{FSType: "ext4", LazyRefcounts: true}
	var unknown []string
	for k, v := range params {
		switch {
		case k == paramFSType:
			if v != "" {
				p.FSType = v
			}
		case k == paramClusterSize:
			n, err := parseSize(v)
			if err != nil || n < 512 || n > 2<<20 || n&(n-1) != 0 {
				return p, newError(errInvalid, "parameter %s=%q: want a power of two from 512 to 2M", k, v)
			}
			p.ClusterSize = int(n)
		case k == paramLazyRefcounts:
			b, err := strconv.ParseBool(v)
			if err != nil {
				return p, newError(errInvalid, "parameter %s=%q: want true or false", k, v)
			}
			p.LazyRefcounts = b
		case k == paramCrossNodeRestore:
			if _, err := strconv.ParseBool(v); err != nil {
				return p, newError(errInvalid, "parameter %s=%q: want true or false", k, v)
			}
		case strings.HasPrefix(k, sidecarPrefix):
		default:
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return p, newError(errInvalid, "unknown parameters: %s (known: %s, %s, %s, %s)",
			strings.Join(unknown, ", "), paramFSType, paramClusterSize, paramLazyRefcounts, paramCrossNodeRestore)
	}
	if err := validateFSType(p.FSType); err != nil {
		return p, err
	}
	return p, nil
}

// parseSnapshotParams accepts only the sidecars' keys.
func parseSnapshotParams(params map[string]string) error {
	return checkSnapshotParams(params, nil)
}

// paramGroupDeletionPolicy is the one key a VolumeGroupSnapshotClass may
// carry among its parameters: Kubernetes' storage e2e suite (v1.37
// test/e2e/storage/utils GenerateVolumeGroupSnapshotClassSpec) puts the
// class's deletionPolicy there as well as in the class's own field, so
// every group snapshot it takes passes it on. It can mean nothing else
// than the field of that name, which is the snapshot-controller's, not
// ours: its values are checked and it is ignored.
const paramGroupDeletionPolicy = "deletionPolicy"

// parseGroupSnapshotParams is parseSnapshotParams for a group snapshot.
func parseGroupSnapshotParams(params map[string]string) error {
	return checkSnapshotParams(params, func(k, v string) (bool, error) {
		if k != paramGroupDeletionPolicy {
			return false, nil
		}
		if v != "Delete" && v != "Retain" {
			return true, newError(errInvalid, "group snapshot parameter %s=%q: want Delete or Retain (it is the class's deletionPolicy, ignored here)", k, v)
		}
		return true, nil
	})
}

// checkSnapshotParams refuses the keys that are neither the sidecars' nor
// known to known (which may refuse a value).
func checkSnapshotParams(params map[string]string, known func(k, v string) (bool, error)) error {
	var unknown []string
	for k, v := range params {
		if strings.HasPrefix(k, sidecarPrefix) {
			continue
		}
		if known != nil {
			ok, err := known(k, v)
			if err != nil {
				return err
			}
			if ok {
				continue
			}
		}
		unknown = append(unknown, k)
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return newError(errInvalid, "unknown snapshot parameters: %s", strings.Join(unknown, ", "))
	}
	return nil
}

func validateFSType(fs string) error {
	switch fs {
	case "ext4", "xfs":
		return nil
	}
	return newError(errInvalid, "fsType %q: want ext4 or xfs", fs)
}

// parseSize reads a byte count with an optional K/M/G suffix (powers of 1024).
func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"), strings.HasSuffix(s, "k"):
		mult = 1 << 10
	case strings.HasSuffix(s, "M"):
		mult = 1 << 20
	case strings.HasSuffix(s, "G"):
		mult = 1 << 30
	}
	if mult != 1 {
		s = s[:len(s)-1]
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<40)/mult {
		return 0, newError(errInvalid, "size %q", s)
	}
	return n * mult, nil
}

// roundCapacity picks the size for a capacity range: required rounded up to
// 1 MiB (default 1 GiB when neither bound is set, or the limit if that is
// smaller), refused with OutOfRange when the limit cannot be honoured.
// min is a lower bound from a content source (0 if none); with a source
// and no required bytes, the size is the source's.
func roundCapacity(r *csi.CapacityRange, min int64) (int64, error) {
	var req, lim int64
	if r != nil {
		req, lim = r.GetRequiredBytes(), r.GetLimitBytes()
	}
	if req < 0 || lim < 0 {
		return 0, newError(errInvalid, "capacity range: negative bytes")
	}
	if lim > 0 && req > lim {
		return 0, newError(errInvalid, "capacity range: required %d > limit %d", req, lim)
	}
	size := req
	if size == 0 && min == 0 {
		size = defaultCapacity
		if lim > 0 && lim < size {
			size = lim
		}
	}
	if size < min {
		size = min
	}
	size = (size + capacityUnit - 1) / capacityUnit * capacityUnit
	if lim > 0 && size > lim {
		return 0, newError(errOutOfRange, "capacity: %d bytes (rounded up to 1 MiB) exceed the limit %d", size, lim)
	}
	if size > maxCapacity {
		return 0, newError(errOutOfRange, "capacity: %d bytes exceed the maximum %d", size, maxCapacity)
	}
	return size, nil
}

// fitsRange reports whether an existing size satisfies a capacity range.
func fitsRange(size int64, r *csi.CapacityRange) bool {
	if r == nil {
		return true
	}
	if size < r.GetRequiredBytes() {
		return false
	}
	return r.GetLimitBytes() == 0 || size <= r.GetLimitBytes()
}

var supportedAccessModes = map[csi.VolumeCapability_AccessMode_Mode]bool{
	csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER:        true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER: true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:  true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:   true,
}

// validateCapabilities checks that caps are well formed (InvalidArgument
// otherwise) and returns a reason if one of them is not supported.
func validateCapabilities(caps []*csi.VolumeCapability) (unsupported string, err error) {
	if len(caps) == 0 {
		return "", newError(errInvalid, "volume capabilities are required")
	}
	for _, c := range caps {
		if c == nil || c.GetAccessMode() == nil {
			return "", newError(errInvalid, "volume capability without an access mode")
		}
		if c.GetBlock() == nil && c.GetMount() == nil {
			return "", newError(errInvalid, "volume capability without an access type (block or mount)")
		}
		if r := unsupportedCapability(c); r != "" && unsupported == "" {
			unsupported = r
		}
	}
	return unsupported, nil
}

func unsupportedCapability(c *csi.VolumeCapability) string {
	if m := c.GetAccessMode().GetMode(); !supportedAccessModes[m] {
		return "access mode " + m.String() + " is not supported: a volume lives on one node"
	}
	if mnt := c.GetMount(); mnt != nil && mnt.GetFsType() != "" {
		if err := validateFSType(mnt.GetFsType()); err != nil {
			return err.Error()
		}
	}
	return ""
}

// validateOneCapability is for node RPCs: one capability, supported.
func validateOneCapability(c *csi.VolumeCapability) error {
	if c == nil {
		return newError(errInvalid, "volume capability is required")
	}
	if r, err := validateCapabilities([]*csi.VolumeCapability{c}); err != nil {
		return err
	} else if r != "" {
		return newError(errInvalid, "%s", r)
	}
	return nil
}

func validateName(what, name string) error {
	if name == "" {
		return newError(errInvalid, "%s is required", what)
	}
	if len(name) > maxNameLen {
		return newError(errInvalid, "%s is longer than %d bytes", what, maxNameLen)
	}
	return nil
}

// volumeIDArg checks a volume id argument: missing is InvalidArgument, not
// one of ours NotFound.
func volumeIDArg(id string) error {
	if id == "" {
		return newError(errInvalid, "volume id is required")
	}
	if !validVolumeID(id) {
		return newError(errNotFound, "volume %q does not exist", truncate(id))
	}
	return nil
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// requireArgs takes (what, value) pairs and refuses the first empty value.
func requireArgs(pairs ...string) error {
	for i := 0; i+1 < len(pairs); i += 2 {
		if pairs[i+1] == "" {
			return newError(errInvalid, "%s is required", pairs[i])
		}
	}
	return nil
}

// validateGetMetadataAllocatedRequest and validateGetMetadataDeltaRequest
// check the arguments as the spec's error tables ask: a missing id or a
// negative max_results is InvalidArgument, a negative starting offset
// OutOfRange (one past the snapshot's end is judged once it is read).
func validateGetMetadataAllocatedRequest(req *csi.GetMetadataAllocatedRequest) error {
	if req.GetSnapshotId() == "" {
		return newError(errInvalid, "snapshot id is required")
	}
	return validateMetadataWindow(req.GetStartingOffset(), req.GetMaxResults())
}

func validateGetMetadataDeltaRequest(req *csi.GetMetadataDeltaRequest) error {
	if req.GetBaseSnapshotId() == "" || req.GetTargetSnapshotId() == "" {
		return newError(errInvalid, "base and target snapshot ids are required")
	}
	return validateMetadataWindow(req.GetStartingOffset(), req.GetMaxResults())
}

func validateMetadataWindow(start int64, maxResults int32) error {
	if start < 0 {
		return newError(errOutOfRange, "starting offset %d is negative", start)
	}
	if maxResults < 0 {
		return newError(errInvalid, "max results %d is negative", maxResults)
	}
	return nil
}
