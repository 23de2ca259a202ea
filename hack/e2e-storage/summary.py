#!/usr/bin/env python3
"""Summarises a ginkgo JSON report of hack/e2e-storage.sh.

Usage: summary.py REPORT.json FOCUS [SKIP [LOG]]

One line per (test suite, test pattern) of the specs FOCUS selects and SKIP
does not (the regexps given to ginkgo): passed, failed, skipped (at run
time, by the suite: a capability not claimed, too few nodes...) and the
wall time; the reasons of the run-time skips; then every failed spec with its run time, location and the first
lines of its failure. With LOG (the suite's output, run with
DEBUG_STORAGE_TESTSUITE set), also the (suite, pattern) pairs the suite did
not even register, by reason: those have no spec in the report at all.
Exits 1 if a spec failed, 2 if the report holds none.
"""
import collections
import json
import re
import sys


def main():
    path, focus = sys.argv[1], sys.argv[2]
    skip = sys.argv[3] if len(sys.argv) > 3 else None
    try:
        with open(path) as f:
            reports = json.load(f)
    except (OSError, ValueError) as e:
        print(f"e2e-storage: no ginkgo report ({e})")
        return 2
    rows = collections.OrderedDict()
    failed = []
    skips = collections.Counter()
    for report in reports:
        for spec in report.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            hier = spec.get("ContainerHierarchyTexts") or []
            # ginkgo leaves empty container texts out of the text it matches
            text = " ".join(t for t in hier + [spec.get("LeafNodeText", "")] if t)
            if not re.search(focus, text) or (skip and re.search(skip, text)):
                continue
            # "[Testpattern: Dynamic PV (default fs)] provisioning" (and tags)
            m = re.match(r"\[Testpattern: (.*?)\]\s*(.*)", hier[1] if len(hier) > 1 else "")
            pattern, suite = (m.group(1), m.group(2) or "-") if m else ("-", "-")
            row = rows.setdefault((suite, pattern), collections.Counter())
            state = spec.get("State", "?")
            secs = spec.get("RunTime", 0) / 1e9
            row[state] += 1
            row["seconds"] += secs
            if state == "skipped":
                msg = ((spec.get("Failure") or {}).get("Message") or "").strip()
                if msg:
                    skips[msg.splitlines()[0]] += 1
            elif state != "passed":
                failed.append((text, state, secs, spec.get("Failure") or {}))
    if not rows:
        print("e2e-storage: the report has no spec that the focus selects")
        return 2
    total = collections.Counter()
    w = max(len(s) for s, _ in rows)
    print(f"{'suite':<{w}}  passed failed skipped   secs  pattern")
    for (suite, pattern), c in sorted(rows.items()):
        bad = sum(v for k, v in c.items() if k not in ("passed", "skipped", "seconds"))
        print(f"{suite:<{w}}  {c['passed']:6} {bad:6} {c['skipped']:7} {c['seconds']:6.0f}  {pattern}")
        total.update(c)
    bad = sum(v for k, v in total.items() if k not in ("passed", "skipped", "seconds"))
    print(f"e2e-storage: {total['passed']} passed, {bad} failed, {total['skipped']} skipped "
          f"({total['seconds']:.0f} s in specs)")
    if skips:
        print("skipped at run time, by reason:")
    for reason, n in sorted(skips.items()):
        print(f"    {n:3}  {reason}")
    if len(sys.argv) > 4:
        unregistered(sys.argv[4])
    for text, state, secs, failure in failed:
        loc = failure.get("Location") or {}
        msg = (failure.get("Message") or "").strip().splitlines()[:6]
        print(f"--- {state} ({secs:.0f} s): {text}")
        print(f"    at {loc.get('FileName', '?')}:{loc.get('LineNumber', '?')}")
        for line in msg:
            print(f"    {line}")
    return 1 if failed else 0


def unregistered(log):
    """Prints the suite's "Skipping registration" lines, grouped."""
    line_re = re.compile(r"Skipping registration: \[Testpattern: (.*?)\] (.*?) \[Driver: .*?\] - (.*)")
    by_reason = collections.OrderedDict()
    try:
        with open(log, errors="replace") as f:
            for line in f:
                m = line_re.search(line)
                if m:
                    pattern, suite, reason = m.groups()
                    by_reason.setdefault((suite, reason.strip()), []).append(pattern)
    except OSError:
        return
    if by_reason:
        print(f"not registered ({sum(len(v) for v in by_reason.values())} suite/pattern pairs):")
    for (suite, reason), patterns in by_reason.items():
        print(f"    {suite}: {len(patterns)} patterns: {reason}")


if __name__ == "__main__":
    sys.exit(main())
