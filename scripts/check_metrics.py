#!/usr/bin/env python3
"""Checks a relay's /metrics text with the Prometheus client library's own parser
(PyPI prometheus-client), and the rules `promtool check metrics` lints: every family
has HELP and TYPE, counters end in _total, a build-info metric is there.

Usage: check_metrics.py FILE. Exit 0 good, 1 a problem (printed), 77 the parser is
not installed (pip install prometheus-client).
"""
import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("prometheus-client is not installed", file=sys.stderr)
    sys.exit(77)


def main(path):
    text = open(path, encoding="utf-8").read()
    problems = []
    declared = {}
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if line.startswith("# HELP ") and len(parts) >= 4 and parts[3].strip():
            declared.setdefault(parts[2], set()).add("help")
        elif line.startswith("# TYPE ") and len(parts) >= 4:
            declared.setdefault(parts[2], set()).add("type")
    families = list(text_string_to_metric_families(text))
    if not families:
        problems.append("no metric at all")
    for family in families:
        exposed = family.name + ("_total" if family.type == "counter" else "")
        if declared.get(exposed, set()) != {"help", "type"}:
            problems.append(f"{exposed}: no HELP or no TYPE line")
        if family.type in ("unknown", "untyped"):
            problems.append(f"{family.name}: no type")
        if not family.documentation:
            problems.append(f"{family.name}: empty HELP")
        if family.type == "counter" and not exposed.endswith("_total"):
            problems.append(f"{family.name}: a counter not named _total")
    if not any(f.name.endswith("_build_info") for f in families):
        problems.append("no build-info metric")
    for problem in problems:
        print(problem)
    print(f"{len(families)} families checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
