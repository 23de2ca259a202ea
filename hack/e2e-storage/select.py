#!/usr/bin/env python3
"""Prints a ginkgo focus regexp selecting exactly the specs of one test suite
that a dry run's JSON report holds.

Usage: select.py REPORT.json SUITE

hack/e2e-storage.sh runs volume-expand in a pass of its own on a second
test-driver definition (see there why); it dry-runs that definition with
the run's FOCUS and SKIP, and focuses the real run on the volume-expand
specs the dry run selected, so that no other suite runs twice. The
regexp is anchored at the end only: the text ginkgo matches has more in
front of the hierarchy the report gives. Prints nothing if there are none.
"""
import json
import re
import sys


def main():
    path, suite = sys.argv[1], sys.argv[2]
    with open(path) as f:
        reports = json.load(f)
    names = []
    for report in reports:
        for spec in report.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It" or spec.get("State") != "passed":
                continue  # a dry run "passes" what it selects
            hier = spec.get("ContainerHierarchyTexts") or []
            m = re.match(r"\[Testpattern: .*?\]\s*(\S+)", hier[1] if len(hier) > 1 else "")
            if m and m.group(1) == suite:
                names.append(" ".join(t for t in hier + [spec.get("LeafNodeText", "")] if t))
    if names:
        print("(" + "|".join(re.escape(n) for n in sorted(set(names))) + ")$")


if __name__ == "__main__":
    sys.exit(main())
