"""What the evidence scripts share: the sweep's flags, its settings and the report file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def sweep_parser(doc: str, default_out: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--r", default="0.95,0.9,0.85,0.8", help="kept fractions to sweep")
    parser.add_argument("--methods", default="tome,pitome,crossget,turbo")
    return parser


def settings(args) -> list[tuple[str, float | None]]:
    """The unmerged baseline first, then every method at every kept fraction."""
    return [("none", None)] + [(m, float(r)) for m in args.methods.split(",") for r in args.r.split(",")]


def write_report(path: str, report: dict):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
