"""Reading a spec file: bounded, plain YAML with unique keys, or one SpecError saying why not.

Kept apart from :mod:`clo_ray.spec.schema` (the spec's shape): this is only about turning
bytes into plain data safely (no tags, no duplicate keys, merge keys allowed, alias expansion
bounded, UTF-8 only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from clo_ray.errors import SpecError

# A spec is a few hundred nodes; the paper's grid about 1,500. Aliases are expanded by what
# reads the data (validation, hashing, dumping), so a document of 30 lines can expand to 10^9
# nodes ("billion laughs"): count the expansion before constructing anything.
MAX_YAML_NODES = 100_000


class _SafeUniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only) that also refuses a key given twice in one mapping:
    plain YAML keeps the last one silently, which hides exactly the typos this spec catches.
    Merge keys (``<<: *defaults``) are YAML's way to share a block: a key a mapping sets
    itself overrides the merged one, as in YAML; only its own keys must be unique."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the document with every alias expanded (a shared node counts each use)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a recursive alias: counted once, PyYAML builds a cycle
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        sizes[id(node)] = min(total, MAX_YAML_NODES + 1)
        return sizes[id(node)]

    return size(root)


def read_yaml(label: str, path: Path) -> Any:
    """The YAML document in ``path``; a SpecError for anything but bounded UTF-8 YAML."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"spec {label}: not UTF-8 text (byte {raw[err.start]:#04x} at offset "
                        f"{err.start}); save the spec as UTF-8") from None
    loader = _SafeUniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_NODES:
            raise SpecError(f"spec {label}: its aliases expand to more than {MAX_YAML_NODES:,} "
                            "YAML nodes (a sweep spec has a few thousand at most): nest fewer "
                            "aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(err, "problem", None) or str(err)
        raise SpecError(f"spec {label}: invalid YAML{where}: {what}") from None
    except RecursionError:
        raise SpecError(f"spec {label}: nested too deeply to be a sweep spec") from None
    finally:
        loader.dispose()
