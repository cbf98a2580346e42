#!/usr/bin/env python3
"""Print the config reference (Markdown) from the field docstrings in src/hafs/training/schema.py.

The schema is the single source of truth for keys, types and defaults; this keeps the README's
reference from drifting: `python scripts/config_reference.py > docs/config-reference.md`.
"""

import ast
import sys
from pathlib import Path

SCHEMA = Path(__file__).resolve().parents[1] / "src" / "hafs" / "training" / "schema.py"
TABLES = [("HardwareProfile", "[hardware.NAME]"), ("ExpertSection", "[experts.NAME]"),
          ("LoraSection", "[lora.NAME]"), ("HyperparameterSection", "[hyperparameters.NAME]"),
          ("DatasetSection", "[datasets.NAME]"), ("PresetSection", "[presets.NAME]"),
          ("OutputSection", "[output]"), ("OutputMetadataFlags", "[output.metadata]"),
          ("MetadataSection", "[metadata]")]


def fields(cls: ast.ClassDef):
    body = cls.body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) and isinstance(body[i + 1].value, ast.Constant):
                doc = str(body[i + 1].value.value)
            default = "(required)" if node.value is None else ast.unparse(node.value)
            if default.startswith("field("):
                default = default.replace("field(default_factory=", "").rstrip(")").replace("lambda: ", "")
            yield node.target.id, ast.unparse(node.annotation), default, doc


def main() -> int:
    tree = ast.parse(SCHEMA.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out = ["# Config reference", "",
           "Generated from `src/hafs/training/schema.py` by `scripts/config_reference.py`.", ""]
    for name, table in TABLES:
        cls = classes[name]
        out += [f"## `{table}`", "", (ast.get_docstring(cls) or "").splitlines()[0], "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default, doc in fields(cls):
            if key.startswith("_") or key == "metadata" and name == "OutputSection":
                continue
            tp = tp.replace("|", "\\|")
            out.append(f"| `{key}` | `{tp}` | `{default}` | {doc.replace('|', '/')} |")
        out.append("")
    sys.stdout.write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
