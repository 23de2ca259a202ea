package main

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"time"
)

// The OCI image-spec v1.1 media types and annotations this writer uses.
// io.containerd.image.name is what `ctr images import` (containerd 1.6
// and later) names the image by, verbatim; without it ctr falls back to
// org.opencontainers.image.ref.name, which the OCI spec makes a tag alone,
// and prefixes it with "import-DATE". Both are written, as containerd's
// own exporter does.
const (
	mediaTypeIndex      = "application/vnd.oci.image.index.v1+json"
	mediaTypeManifest   = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeConfig     = "application/vnd.oci.image.config.v1+json"
	mediaTypeLayer      = "application/vnd.oci.image.layer.v1.tar"
	annotationImageName = "io.containerd.image.name"
	annotationRefName   = "org.opencontainers.image.ref.name"
	layoutVersion       = `{"imageLayoutVersion":"1.0.0"}`
)

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Platform    *platform         `json:"platform,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

type index struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Manifests     []descriptor `json:"manifests"`
}

type manifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Config        descriptor   `json:"config"`
	Layers        []descriptor `json:"layers"`
}

type imageConfig struct {
	Created      string          `json:"created"`
	Architecture string          `json:"architecture"`
	OS           string          `json:"os"`
	Config       containerConfig `json:"config"`
	RootFS       rootFS          `json:"rootfs"`
}

// containerConfig is the part of the image config a runtime starts the
// container from.
type containerConfig struct {
	User       string   `json:"User,omitempty"`
	Env        []string `json:"Env,omitempty"`
	Entrypoint []string `json:"Entrypoint,omitempty"`
	Cmd        []string `json:"Cmd,omitempty"`
	WorkingDir string   `json:"WorkingDir,omitempty"`
}

type rootFS struct {
	Type    string   `json:"type"`
	DiffIDs []string `json:"diff_ids"`
}

// image is what one archive holds: one image for linux/amd64.
type image struct {
	name   string   // fully qualified, with a tag (validateName)
	layers []string // directories or uncompressed tars, bottom first
	config containerConfig
	epoch  time.Time // every mtime, and the config's created
}

// blob is a finished blob: its descriptor and where its bytes are.
type blob struct {
	desc descriptor
	file string // on disk, for layers
	data []byte // in memory, for JSON
}

// build writes img as an OCI image-layout tar at out, replacing out only
// once the archive is complete. Layers are staged in a temporary
// directory next to out, since a blob's name is its digest and the tar
// header comes before the bytes.
func build(img image, out string, log io.Writer) (descriptor, error) {
	tmp, err := os.MkdirTemp(filepath.Dir(out), ".ociimage-")
	if err != nil {
		return descriptor{}, err
	}
	defer os.RemoveAll(tmp)
	var blobs []blob
	cfg := imageConfig{
		Created:      img.epoch.UTC().Format(time.RFC3339),
		Architecture: "amd64",
		OS:           "linux",
		Config:       img.config,
		RootFS:       rootFS{Type: "layers", DiffIDs: []string{}},
	}
	var layers []descriptor
	for i, src := range img.layers {
		b, err := buildLayer(src, filepath.Join(tmp, fmt.Sprintf("layer%d", i)), img.epoch, log)
		if err != nil {
			return descriptor{}, err
		}
		blobs = append(blobs, b)
		layers = append(layers, b.desc)
		// Uncompressed: the layer's digest is its diff_id.
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, b.desc.Digest)
	}
	cfgBlob, err := jsonBlob(mediaTypeConfig, cfg)
	if err != nil {
		return descriptor{}, err
	}
	man, err := jsonBlob(mediaTypeManifest, manifest{
		SchemaVersion: 2, MediaType: mediaTypeManifest, Config: cfgBlob.desc, Layers: layers,
	})
	if err != nil {
		return descriptor{}, err
	}
	blobs = append(blobs, cfgBlob, man)
	desc := man.desc
	desc.Platform = &platform{Architecture: "amd64", OS: "linux"}
	desc.Annotations = map[string]string{annotationImageName: img.name, annotationRefName: tagOf(img.name)}
	idx, err := json.Marshal(index{SchemaVersion: 2, MediaType: mediaTypeIndex, Manifests: []descriptor{desc}})
	if err != nil {
		return descriptor{}, err
	}
	part := filepath.Join(tmp, "archive")
	if err := writeArchive(part, blobs, idx, img.epoch); err != nil {
		return descriptor{}, err
	}
	return desc, os.Rename(part, out)
}

// buildLayer writes the layer tar of one source to file, hashing it.
func buildLayer(src, file string, epoch time.Time, log io.Writer) (blob, error) {
	l, err := sourceEntries(src, epoch)
	if err != nil {
		return blob{}, err
	}
	defer l.close()
	if err := sortEntries(l.entries); err != nil {
		return blob{}, fmt.Errorf("%s: %w", src, err)
	}
	f, err := os.Create(file)
	if err != nil {
		return blob{}, err
	}
	defer f.Close()
	h := sha256.New()
	cw := &countWriter{w: io.MultiWriter(f, h)}
	if err := writeLayer(cw, l.entries); err != nil {
		return blob{}, fmt.Errorf("%s: %w", src, err)
	}
	if err := f.Close(); err != nil {
		return blob{}, err
	}
	d := descriptor{MediaType: mediaTypeLayer, Digest: digestOf(h), Size: cw.n}
	fmt.Fprintf(log, "ociimage: layer %s: %d entries, %d bytes, %s", src, len(l.entries), cw.n, d.Digest)
	if l.dropped > 0 {
		fmt.Fprintf(log, " (left out %d device nodes/FIFOs)", l.dropped)
	}
	fmt.Fprintln(log)
	return blob{desc: d, file: file}, nil
}

// sourceEntries reads a layer source: a directory or an uncompressed tar.
func sourceEntries(src string, epoch time.Time) (*layerEntries, error) {
	fi, err := os.Stat(src)
	if err != nil {
		return nil, fmt.Errorf("layer source: %w", err)
	}
	switch {
	case fi.IsDir():
		return dirEntries(src, epoch)
	case fi.Mode().IsRegular():
		return tarEntries(src, epoch)
	}
	return nil, fmt.Errorf("%s is neither a directory nor a tar file", src)
}

func jsonBlob(mediaType string, v any) (blob, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return blob{}, err
	}
	sum := sha256.Sum256(data)
	return blob{
		desc: descriptor{MediaType: mediaType, Digest: "sha256:" + hex.EncodeToString(sum[:]), Size: int64(len(data))},
		data: data,
	}, nil
}

// writeArchive writes the image layout: blobs/sha256/<hex> for every blob
// (once, should two layers be equal), then index.json and oci-layout.
func writeArchive(file string, blobs []blob, idx []byte, epoch time.Time) error {
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: epoch}); err != nil {
			return err
		}
	}
	seen := map[string]bool{}
	for _, b := range blobs {
		if seen[b.desc.Digest] {
			continue
		}
		seen[b.desc.Digest] = true
		name := "blobs/sha256/" + b.desc.Digest[len("sha256:"):]
		if err := writeArchiveFile(tw, name, b, epoch); err != nil {
			return err
		}
	}
	for _, m := range []struct {
		name string
		data []byte
	}{{"index.json", idx}, {"oci-layout", []byte(layoutVersion)}} {
		b := blob{desc: descriptor{Size: int64(len(m.data))}, data: m.data}
		if err := writeArchiveFile(tw, m.name, b, epoch); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}

func writeArchiveFile(tw *tar.Writer, name string, b blob, epoch time.Time) error {
	hdr := &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: b.desc.Size, ModTime: epoch}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if b.file == "" {
		_, err := tw.Write(b.data)
		return err
	}
	f, err := os.Open(b.file)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.CopyN(tw, f, b.desc.Size)
	return err
}

func digestOf(h hash.Hash) string { return "sha256:" + hex.EncodeToString(h.Sum(nil)) }

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
