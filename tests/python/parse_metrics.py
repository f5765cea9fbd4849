"""Parses OpenMetrics text from stdin with prometheus_client's own parser and prints every
family as JSON: {name: {"type": ..., "samples": [[sample name, labels, value], ...]}}.
The parser raises on anything that is not valid OpenMetrics, which fails the calling test."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

families = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    families[family.name] = {
        "type": family.type,
        "samples": [[s.name, s.labels, s.value] for s in family.samples],
    }
json.dump(families, sys.stdout)
