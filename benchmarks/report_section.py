"""One named section of a shared report file (reports/performance.md), so that each benchmark
script rewrites its own figures and keeps the others': a section lies between the lines
``<!-- section NAME -->`` and ``<!-- end NAME -->``; a missing one is appended."""

from __future__ import annotations

import re
from pathlib import Path

from hetpure_bench.atomic import write_text_atomic


def replace_section(document: str, name: str, body: str) -> str:
    """``document`` with section ``name`` holding ``body`` (pure; appended when absent)."""
    block = f"<!-- section {name} -->\n{body.strip()}\n<!-- end {name} -->\n"
    pattern = re.compile(rf"<!-- section {re.escape(name)} -->\n.*?<!-- end {re.escape(name)} -->\n", re.S)
    if pattern.search(document):
        return pattern.sub(lambda _: block, document, count=1)
    return document.rstrip("\n") + ("\n\n" if document.strip() else "") + block


def write_section(path: Path, name: str, body: str) -> None:
    """Rewrite section ``name`` of the file at ``path`` atomically (the file is made if absent)."""
    document = path.read_text() if path.exists() else ""
    write_text_atomic(path, replace_section(document, name, body))
