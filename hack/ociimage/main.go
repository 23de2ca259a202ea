// Command ociimage writes one container image, built from directories and
// tars, as an OCI image-layout tar archive that `ctr images import` takes
// and names, with no container engine:
//
//	ociimage -o pause.tar -name registry.k8s.io/pause:3.10 \
//	    -layer ./rootfs -entrypoint '["/pause"]' -user 65535:65535
//
// Each -layer is one uncompressed layer (application/vnd.oci.image.layer.v1.tar:
// an importer under emulation would spend its time in gunzip). The output
// is reproducible: entries sorted by path, every mtime the -epoch, owners
// 0:0 for directory sources (a tar source keeps its own), no user names
// or extended attributes, device nodes and FIFOs left out. The same inputs
// give the same bytes, so the same digests.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv("SOURCE_DATE_EPOCH"), os.Stderr))
}

// run is the command: exit code 0 on success, 1 when the image cannot be
// built, 2 for a bad command line.
func run(args []string, sourceDateEpoch string, stderr io.Writer) int {
	img, out, err := parseArgs(args, sourceDateEpoch, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "ociimage:", err)
		return 2
	}
	desc, err := build(img, out, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "ociimage:", err)
		return 1
	}
	fmt.Fprintf(stderr, "ociimage: wrote %s: %s %s\n", out, img.name, desc.Digest)
	return 0
}

func parseArgs(args []string, sourceDateEpoch string, stderr io.Writer) (image, string, error) {
	var (
		img              image
		out, entrypoint  string
		cmd, epochString string
	)
	fs := flag.NewFlagSet("ociimage", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&out, "o", "", "the archive to write (required)")
	fs.StringVar(&img.name, "name", "", "the image's full name with a tag, e.g. registry.k8s.io/pause:3.10 (required)")
	fs.Func("layer", "a layer: a directory or an uncompressed tar; repeat, bottom first (one at least)", func(s string) error {
		img.layers = append(img.layers, s)
		return nil
	})
	fs.StringVar(&entrypoint, "entrypoint", "", `the Entrypoint as a JSON array, e.g. '["/pause"]'`)
	fs.StringVar(&cmd, "cmd", "", "the Cmd as a JSON array")
	fs.Func("env", "an Env entry KEY=VALUE; repeat", func(s string) error {
		if !strings.Contains(s, "=") || strings.HasPrefix(s, "=") {
			return fmt.Errorf("%q is not KEY=VALUE", s)
		}
		img.config.Env = append(img.config.Env, s)
		return nil
	})
	fs.StringVar(&img.config.User, "user", "", "the User, e.g. 65532:65532")
	fs.StringVar(&img.config.WorkingDir, "workdir", "", "the WorkingDir")
	fs.StringVar(&epochString, "epoch", sourceDateEpoch, "Unix seconds for every mtime and the config's created (default $SOURCE_DATE_EPOCH, else 0)")
	if err := fs.Parse(args); err != nil {
		return img, "", err
	}
	if fs.NArg() > 0 {
		return img, "", fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if out == "" || len(img.layers) == 0 {
		return img, "", errors.New("-o and at least one -layer are required")
	}
	if err := validateName(img.name); err != nil {
		return img, "", err
	}
	var err error
	if img.config.Entrypoint, err = jsonArray("-entrypoint", entrypoint); err != nil {
		return img, "", err
	}
	if img.config.Cmd, err = jsonArray("-cmd", cmd); err != nil {
		return img, "", err
	}
	if img.epoch, err = parseEpoch(epochString); err != nil {
		return img, "", err
	}
	return img, out, nil
}

func jsonArray(flagName, s string) ([]string, error) {
	if s == "" {
		return nil, nil
	}
	var v []string
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		return nil, fmt.Errorf(`%s %q: want a JSON array of strings, e.g. '["/bin/sh","-c"]': %w`, flagName, s, err)
	}
	return v, nil
}

func parseEpoch(s string) (time.Time, error) {
	if s == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return time.Time{}, fmt.Errorf("-epoch %q: want Unix seconds, 0 or more", s)
	}
	return time.Unix(n, 0).UTC(), nil
}

var (
	pathComponent = regexp.MustCompile(`^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$`)
	tagPattern    = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)
)

// validateName accepts a full reference with a registry and a tag
// (registry.k8s.io/pause:3.10, docker.io/library/busybox:1.35.0,
// localhost/csi-qcow2:dev). Kubelet asks containerd for the normalized
// name ("busybox:1.35.0" becomes "docker.io/library/busybox:1.35.0"), and
// ctr stores the name as written, so a short name would never be found.
func validateName(name string) error {
	bad := func(why string) error {
		return fmt.Errorf("-name %q: %s; want a full name such as docker.io/library/busybox:1.35.0", name, why)
	}
	slash := strings.Index(name, "/")
	if slash < 0 {
		return bad("no registry")
	}
	domain := name[:slash]
	if !strings.ContainsAny(domain, ".:") && domain != "localhost" {
		return bad("no registry")
	}
	rest := name[slash+1:]
	colon := strings.LastIndex(rest, ":")
	if colon < 0 || strings.Contains(rest, "@") {
		return bad("no tag")
	}
	if !tagPattern.MatchString(rest[colon+1:]) {
		return bad("bad tag")
	}
	for _, c := range strings.Split(rest[:colon], "/") {
		if !pathComponent.MatchString(c) {
			return bad(fmt.Sprintf("bad path component %q", c))
		}
	}
	return nil
}

// tagOf is the tag of a name validateName accepted.
func tagOf(name string) string { return name[strings.LastIndex(name, ":")+1:] }
