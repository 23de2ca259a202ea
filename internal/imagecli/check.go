package imagecli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/pflag"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func checkSpec() spec {
	return spec{
		name:     "check",
		synopsis: "[-f FMT] [-r leaks|all] [--output=human|json] [-q] FILE",
		summary:  "Check a qcow2 image's metadata for consistency, optionally repairing it.",
		help: `Each problem found is printed to stderr ("Leaked cluster 9 refcount=1
reference=0", "ERROR cluster 5 refcount=0 reference=1"); the summary goes
to stdout. With -r, problems are repaired, then the image is checked again
and the summary describes that second check.

  -r leaks   free leaked clusters (refcount higher than the references)
  -r all     also fix refcounts that are too low and wrong COPIED flags

Exit status (as qemu-img):
  0   no problems remain
  1   the check could not be done (cannot open or read the image,
      internal errors during the check)
  2   corruptions remain (data may be damaged; try -r all on a copy)
  3   only leaked clusters remain (wasted space, no harm to data)
  63  the format has no consistency check (raw images)
`,
		new: func() subcommand { return &checkCmd{} },
	}
}

type checkCmd struct {
	format string
	repair string
	output string
	quiet  bool
}

func (c *checkCmd) flags(fs *pflag.FlagSet) {
	fs.StringVarP(&c.format, "format", "f", "", "image format: qcow2 or raw (default: probe)")
	fs.StringVarP(&c.repair, "repair", "r", "", "repair: leaks or all")
	fs.StringVar(&c.output, "output", "human", "output format: human or json")
	fs.BoolVarP(&c.quiet, "quiet", "q", false, "print nothing but errors to stdout")
}

func parseRepair(s string) (qcow2.Repair, error) {
	switch s {
	case "":
		return qcow2.RepairNone, nil
	case "leaks":
		return qcow2.RepairLeaks, nil
	case "all":
		return qcow2.RepairAll, nil
	}
	return 0, usageErrorf("-r must be leaks or all, not %q", s)
}

func (c *checkCmd) run(_ context.Context, s streams, args []string) error {
	repair, err := parseRepair(c.repair)
	if err != nil {
		return err
	}
	if err := checkOutput(c.output); err != nil {
		return err
	}
	if len(args) != 1 {
		return usageErrorf("expected FILE, got %d arguments", len(args))
	}
	path := args[0]
	format, err := resolveFormat(path, c.format)
	if err != nil {
		return err
	}
	if format != formatQcow2 {
		return &exitError{code: exitUnsupported, err: errors.New("this image format does not support checks")}
	}
	res, err := c.check(s, path, repair)
	if err != nil {
		return fmt.Errorf("check of '%s' failed: %w", path, err)
	}
	if err := c.print(s.stdout, path, res); err != nil {
		return err
	}
	return checkStatus(res)
}

// check runs the check and, after a repair that fixed anything, checks
// again and reports the second result with the first one's fixed counts,
// as qemu-img does.
func (c *checkCmd) check(s streams, path string, repair qcow2.Repair) (*qcow2.CheckResult, error) {
	res, err := qcow2.CheckFile(path, qcow2.CheckOptions{Repair: repair})
	if err != nil {
		return nil, err
	}
	printProblems(s.stderr, res)
	if res.LeaksFixed == 0 && res.CorruptionsFixed == 0 {
		return res, nil
	}
	if c.output == "human" && !c.quiet {
		fmt.Fprintf(s.stdout, "The following inconsistencies were found and repaired:\n\n"+
			"    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n",
			res.LeaksFixed, res.CorruptionsFixed)
	}
	again, err := qcow2.CheckFile(path, qcow2.CheckOptions{Repair: qcow2.RepairNone})
	if err != nil {
		return nil, err
	}
	printProblems(s.stderr, again)
	again.LeaksFixed, again.CorruptionsFixed = res.LeaksFixed, res.CorruptionsFixed
	return again, nil
}

func printProblems(w io.Writer, res *qcow2.CheckResult) {
	for _, p := range res.Problems {
		fmt.Fprintln(w, p)
	}
}

func (c *checkCmd) print(w io.Writer, path string, res *qcow2.CheckResult) error {
	if c.quiet {
		return nil
	}
	if c.output == "json" {
		return writeJSON(w, newImageCheck(path, res))
	}
	_, err := io.WriteString(w, humanCheck(res))
	return err
}

// checkStatus maps what remains wrong to qemu-img check's exit status.
func checkStatus(res *qcow2.CheckResult) error {
	switch {
	case res.CheckErrors > 0:
		return &exitError{code: exitFailure, err: fmt.Errorf("check failed: %d internal errors", res.CheckErrors)}
	case res.Corruptions > 0:
		return &exitError{code: exitCorrupt}
	case res.Leaks > 0:
		return &exitError{code: exitLeaks}
	}
	return nil
}

// humanCheck is qemu-img's dump_human_image_check.
func humanCheck(r *qcow2.CheckResult) string {
	var b strings.Builder
	if r.Clean() {
		b.WriteString("No errors were found on the image.\n")
	}
	if r.Corruptions > 0 {
		fmt.Fprintf(&b, "\n%d errors were found on the image.\n"+
			"Data may be corrupted, or further writes to the image may corrupt it.\n", r.Corruptions)
	}
	if r.Leaks > 0 {
		fmt.Fprintf(&b, "\n%d leaked clusters were found on the image.\n"+
			"This means waste of disk space, but no harm to data.\n", r.Leaks)
	}
	if r.CheckErrors > 0 {
		fmt.Fprintf(&b, "\n%d internal errors have occurred during the check.\n", r.CheckErrors)
	}
	if r.TotalClusters != 0 && r.AllocatedClusters != 0 {
		fmt.Fprintf(&b, "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
			r.AllocatedClusters, r.TotalClusters,
			float64(r.AllocatedClusters)*100/float64(r.TotalClusters),
			float64(r.FragmentedClusters)*100/float64(r.AllocatedClusters),
			float64(r.CompressedClusters)*100/float64(r.AllocatedClusters))
	}
	if r.ImageEndOffset != 0 {
		fmt.Fprintf(&b, "Image end offset: %d\n", r.ImageEndOffset)
	}
	return b.String()
}

// imageCheck is qemu-img's ImageCheck JSON; zero optional counts are
// omitted as qemu-img omits them.
type imageCheck struct {
	ImageEndOffset     int64  `json:"image-end-offset,omitempty"`
	TotalClusters      int64  `json:"total-clusters,omitempty"`
	Corruptions        int64  `json:"corruptions,omitempty"`
	CorruptionsFixed   int64  `json:"corruptions-fixed,omitempty"`
	CheckErrors        int64  `json:"check-errors"`
	Leaks              int64  `json:"leaks,omitempty"`
	LeaksFixed         int64  `json:"leaks-fixed,omitempty"`
	AllocatedClusters  int64  `json:"allocated-clusters,omitempty"`
	FragmentedClusters int64  `json:"fragmented-clusters,omitempty"`
	CompressedClusters int64  `json:"compressed-clusters,omitempty"`
	Filename           string `json:"filename"`
	Format             string `json:"format"`
}

func newImageCheck(path string, r *qcow2.CheckResult) imageCheck {
	return imageCheck{
		ImageEndOffset: r.ImageEndOffset, TotalClusters: r.TotalClusters,
		Corruptions: r.Corruptions, CorruptionsFixed: r.CorruptionsFixed,
		CheckErrors: r.CheckErrors, Leaks: r.Leaks, LeaksFixed: r.LeaksFixed,
		AllocatedClusters: r.AllocatedClusters, FragmentedClusters: r.FragmentedClusters,
		CompressedClusters: r.CompressedClusters, Filename: path, Format: formatQcow2,
	}
}
