package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Layout of the data dir (all directories 0700, all files 0600):
//
//	volumes/<volumeID>.qcow2   the volume's image
//	volumes/<volumeID>.json    its metadata: the volume exists iff this exists
//	snapshots/<snapshotID>.json  a snapshot: an internal snapshot named
//	                           <snapshotID> inside its source volume's image
//	staged/<volumeID>.json     a volume staged on this node (for restarts)
//	groups/<groupID>.json      a volume group snapshot: its member snapshots,
//	                           each an ordinary snapshots/<snapshotID>.json
//
// Ids are ours: "vol-", "snap-" or "gsnap-" and 32 hex digits of the
// SHA-256 of the CO's name, so create-by-name finds its earlier result on
// disk in O(1). Anything else is not an id of ours and is never turned
// into a path.
const (
	volumePrefix   = "vol-"
	snapshotPrefix = "snap-"
	groupPrefix    = "gsnap-"
	imageExt       = ".qcow2"
	metaExt        = ".json"
)

var (
	volumeIDPattern   = regexp.MustCompile(`^vol-[0-9a-f]{32}$`)
	snapshotIDPattern = regexp.MustCompile(`^snap-[0-9a-f]{32}$`)
	groupIDPattern    = regexp.MustCompile(`^gsnap-[0-9a-f]{32}$`)
)

func idFor(prefix, name string) string {
	sum := sha256.Sum256([]byte(name))
	return prefix + hex.EncodeToString(sum[:16])
}

func volumeIDFor(name string) string   { return idFor(volumePrefix, name) }
func snapshotIDFor(name string) string { return idFor(snapshotPrefix, name) }
func groupIDFor(name string) string    { return idFor(groupPrefix, name) }

// memberSnapshotIDFor is the id of the snapshot of volume volID in group
// groupID. Its hash input holds NULs, which the spec bans from CO names,
// so no CreateSnapshot name maps to it.
func memberSnapshotIDFor(groupID, volID string) string {
	return idFor(snapshotPrefix, "\x00group\x00"+groupID+"\x00"+volID)
}

func validVolumeID(id string) bool   { return volumeIDPattern.MatchString(id) }
func validSnapshotID(id string) bool { return snapshotIDPattern.MatchString(id) }
func validGroupID(id string) bool    { return groupIDPattern.MatchString(id) }

// volumeMeta is volumes/<id>.json.
type volumeMeta struct {
	ID            string       `json:"id"`
	Name          string       `json:"name"`
	CapacityBytes int64        `json:"capacityBytes"`
	Params        createParams `json:"params"`
	// At most one of these is set: where the content came from.
	SourceSnapshotID string    `json:"sourceSnapshotID,omitempty"`
	SourceVolumeID   string    `json:"sourceVolumeID,omitempty"`
	CreatedAt        time.Time `json:"createdAt"`
}

// snapshotMeta is snapshots/<id>.json.
type snapshotMeta struct {
	ID             string    `json:"id"`
	Name           string    `json:"name"`
	SourceVolumeID string    `json:"sourceVolumeID"`
	SizeBytes      int64     `json:"sizeBytes"`
	CreatedAt      time.Time `json:"createdAt"`
	// GroupSnapshotID is set on the members of a volume group snapshot.
	GroupSnapshotID string `json:"groupSnapshotID,omitempty"`
}

// groupMeta is groups/<id>.json. SnapshotIDs[i] is the snapshot of
// SourceVolumeIDs[i]; the volume ids are sorted.
type groupMeta struct {
	ID              string    `json:"id"`
	Name            string    `json:"name"`
	SourceVolumeIDs []string  `json:"sourceVolumeIDs"`
	SnapshotIDs     []string  `json:"snapshotIDs"`
	CreatedAt       time.Time `json:"createdAt"`
}

// stagedMeta is staged/<id>.json: enough to serve and reattach a staged
// volume after a restart without remounting.
type stagedMeta struct {
	VolumeID    string `json:"volumeID"`
	StagingPath string `json:"stagingPath"`
	Block       bool   `json:"block"`
	FSType      string `json:"fsType,omitempty"`
	DeviceIndex int    `json:"deviceIndex"`
	ReadOnly    bool   `json:"readOnly,omitempty"`
}

// store reads and writes the data dir. It knows nothing of CSI or gRPC.
type store struct {
	root string
}

// newStore makes the data dir's directories. The root may be a symlink
// (an operator's choice); the directories in it must be real ones, or
// everything below would land wherever a planted link points.
func newStore(root string) (*store, error) {
	s := &store{root: root}
	for _, d := range []string{s.dir("volumes"), s.dir("snapshots"), s.dir("staged"), s.dir("groups")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("data dir: %w", err)
		}
		fi, err := os.Lstat(d)
		if err != nil {
			return nil, fmt.Errorf("data dir: %w", err)
		}
		if !fi.IsDir() {
			return nil, fmt.Errorf("data dir: %s is %s, not a directory; refusing to use it", d, fileKind(fi))
		}
	}
	return s, nil
}

func (s *store) dir(kind string) string { return filepath.Join(s.root, kind) }

// imagePath is the image of a volume; id must be valid (checked here too,
// so that no caller can ever turn a foreign string into a path).
func (s *store) imagePath(id string) string {
	if !validVolumeID(id) {
		panic("driver: imagePath called with an unchecked id")
	}
	return filepath.Join(s.dir("volumes"), id+imageExt)
}

func (s *store) metaPath(kind, id string) (string, error) {
	ok := validVolumeID(id)
	switch kind {
	case "snapshots":
		ok = validSnapshotID(id)
	case "groups":
		ok = validGroupID(id)
	}
	if !ok {
		return "", newError(errNotFound, "%s %q: no such id", strings.TrimSuffix(kind, "s"), id)
	}
	return filepath.Join(s.dir(kind), id+metaExt), nil
}

func (s *store) read(kind, id string, v any) error {
	p, err := s.metaPath(kind, id)
	if err != nil {
		return err
	}
	b, err := readRegularFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return newError(errNotFound, "%s %s does not exist", strings.TrimSuffix(kind, "s"), id)
	}
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	return nil
}

func (s *store) write(kind, id string, v any) error {
	p, err := s.metaPath(kind, id)
	if err != nil {
		return err
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(p, append(b, '\n'))
}

func (s *store) remove(kind, id string) error {
	p, err := s.metaPath(kind, id)
	if err != nil {
		return err
	}
	return removeDurably(p)
}

func (s *store) list(kind string) ([]string, error) {
	ents, err := os.ReadDir(s.dir(kind))
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range ents {
		id, ok := strings.CutSuffix(e.Name(), metaExt)
		if ok && (validVolumeID(id) || validSnapshotID(id) || validGroupID(id)) {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	return ids, nil
}

func (s *store) readVolume(id string) (*volumeMeta, error) {
	var m volumeMeta
	return &m, s.read("volumes", id, &m)
}

func (s *store) readSnapshot(id string) (*snapshotMeta, error) {
	var m snapshotMeta
	return &m, s.read("snapshots", id, &m)
}

func (s *store) readGroup(id string) (*groupMeta, error) {
	var m groupMeta
	return &m, s.read("groups", id, &m)
}

func (s *store) readStaged(id string) (*stagedMeta, error) {
	var m stagedMeta
	return &m, s.read("staged", id, &m)
}

// The files of the data dir are only ever ours: regular files, never
// symlinks. A link planted in their place (or a FIFO, a device) is refused
// with a clear error instead of followed, so nothing outside the data dir
// is read, opened or written through it. Replacing a file (rename) and
// removing one (unlink) act on the link itself, never on its target.

// readRegularFile reads a file that must be a regular file, without
// following a symlink (O_NOFOLLOW) or blocking on a FIFO (O_NONBLOCK).
func readRegularFile(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if errors.Is(err, syscall.ELOOP) {
		return nil, newError(errFailedPrecondition, "%s is a symlink; refusing to follow it", path)
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, newError(errFailedPrecondition, "%s is %s, not a regular file; refusing to read it", path, fileKind(fi))
	}
	return io.ReadAll(io.LimitReader(f, maxMetaSize+1))
}

// fileKind names what a data dir entry is, for errors.
func fileKind(fi fs.FileInfo) string {
	switch t := fi.Mode().Type(); {
	case t&fs.ModeSymlink != 0:
		return "a symlink"
	case t&fs.ModeDir != 0:
		return "a directory"
	case t&fs.ModeNamedPipe != 0:
		return "a FIFO"
	case t == 0:
		return "a regular file"
	default:
		return "a special file (" + t.String() + ")"
	}
}

// maxMetaSize bounds what a metadata file may hold (ours are under 1 KiB).
const maxMetaSize = 1 << 20

// checkImage returns the path of a volume's image after checking that it
// is a regular file: not a symlink (an image is opened by path, so the
// check is an Lstat; only someone who can write the 0700 data dir could
// swap it in between).
func (s *store) checkImage(id string) (string, error) {
	p := s.imagePath(id)
	fi, err := os.Lstat(p)
	if err != nil {
		return "", err
	}
	if !fi.Mode().IsRegular() {
		return "", newError(errFailedPrecondition, "volume image %s is %s, not a regular file; refusing to open it", p, fileKind(fi))
	}
	return p, nil
}

// openImage opens a volume's image (see checkImage). Volumes never have
// backing files, so one named in the header is refused rather than opened.
func (s *store) openImage(id string, opts qcow2.OpenOptions) (*qcow2.Image, error) {
	p, err := s.checkImage(id)
	if err != nil {
		return nil, err
	}
	opts.NoBacking = true
	img, err := qcow2.Open(p, opts)
	if err != nil {
		return nil, err
	}
	if b := img.Info().BackingFile; b != "" {
		img.Close()
		return nil, newError(errFailedPrecondition, "volume image %s names a backing file (%q); volumes never have one", p, b)
	}
	return img, nil
}

// writeFileAtomic replaces path with data: write a temporary file in the
// same directory, fsync it, rename it over path, fsync the directory. A
// crash leaves either the old or the new content, never a torn file.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op once renamed
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(dir)
}

// removeDurably removes path (absent is fine) and fsyncs its directory.
func removeDurably(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
