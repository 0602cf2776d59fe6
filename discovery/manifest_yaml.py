"""YAML with line numbers: the loader behind manifest parsing.

Mappings and sequences built by ``LineLoader`` remember the line of every key and item
(``LineDict.key_lines`` / ``LineList.item_lines``), so a field path found wrong later can be
mapped back to the line a person has to edit (``line_of``). Duplicate keys are refused, and
timestamps stay strings.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["LineDict", "LineList", "LineLoader", "line_of", "HAVE_LIBYAML"]


class LineDict(dict):
    __slots__ = ("line", "key_lines")


class LineList(list):
    __slots__ = ("line", "item_lines")


# LibYAML's C scanner and parser, when pyyaml was built with it, are ~10x faster than the pure
# Python ones; the constructor (where lines are recorded) is Python either way.
HAVE_LIBYAML = bool(getattr(yaml, "__with_libyaml__", False) and hasattr(yaml, "CSafeLoader"))
_BaseLoader = yaml.CSafeLoader if HAVE_LIBYAML else yaml.SafeLoader


class LineLoader(_BaseLoader):  # type: ignore[valid-type, misc]
    """SafeLoader whose mappings and sequences remember the line of every key and item."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        # Build a plain dict first (SafeLoader handles merge keys), then attach the lines.
        self.flatten_mapping(node)
        result = LineDict()
        result.line = node.start_mark.line + 1
        result.key_lines = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "found unhashable key", key_node.start_mark) from None
            if key in result:
                # kubectl's strict decoder refuses this too; silently keeping the last value hides typos.
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
            result[key] = self.construct_object(value_node, deep=True)
            result.key_lines[key] = key_node.start_mark.line + 1
        return result

    def construct_sequence(self, node, deep=False):  # type: ignore[override]
        result = LineList(self.construct_object(child, deep=True) for child in node.value)
        result.line = node.start_mark.line + 1
        result.item_lines = [child.start_mark.line + 1 for child in node.value]
        return result


def _construct_map(loader, node):
    return loader.construct_mapping(node)


def _construct_seq(loader, node):
    return loader.construct_sequence(node)


LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)
# Timestamps stay strings: creationTimestamp is compared as RFC 3339 text, as the API does.
LineLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def line_of(container: Any, key: Any = None) -> int | None:
    """The line of ``container[key]`` (or of the container), None when unknown."""
    if key is not None:
        if isinstance(container, LineDict):
            return container.key_lines.get(key, container.line)
        if isinstance(container, LineList) and isinstance(key, int) and key < len(container.item_lines):
            return container.item_lines[key]
    return getattr(container, "line", None)
