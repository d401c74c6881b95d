"""Reading a spec's YAML within bounds: a size limit, a few aliases at most (counted before anything is
expanded, so an alias bomb costs nothing), UTF-8 only, and no key given twice in one mapping.

`spec.load_spec` turns every refusal here into a one-line SpecError naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_SPEC_BYTES = 1_000_000  # a spec is a few hundred bytes; anything this large is not one
MAX_ALIASES = 50  # `<<: *base` and the like; a bomb needs far more (each alias may double the data)


class Refused(Exception):
    """YAML that bstune will not read; the message says where and why."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, counting aliases as the document is composed and refusing duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                line = self.peek_event().start_mark.line + 1
                raise Refused(f"line {line}: more than {MAX_ALIASES} aliases (*name); a spec needs few or none, "
                              f"write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may be overridden by the keys beside it
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                raise Refused(f"line {line}: a mapping's key must be a plain value, got {key_node.tag}") from None
            seen[key] = line
            if first is not None:
                raise Refused(f"line {line}: key {key!r} is given twice in one mapping (first on line {first}); "
                              f"keep one")
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML document in `path`, or Refused (size, encoding, aliases, duplicate keys, YAML syntax)."""
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise Refused(f"is {size:,} bytes; a spec must be under {MAX_SPEC_BYTES:,} (is this the right file?)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise Refused(f"line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise Refused(f"{where}invalid YAML ({problem}); check indentation and quoting") from None
    except RecursionError:
        raise Refused("nested too deeply to be a spec") from None
