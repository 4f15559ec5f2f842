"""YAML text → plain data plus the line of every key, refusing what a storyboard has no use for.

Only plain scalars, lists and mappings are read (no aliases, merge keys or custom tags), with the safe
loader; every YAML problem is a one-line :class:`~slotgen.errors.StoryboardError` at its line.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from slotgen.errors import StoryboardError
from slotgen.storyboard.messages import FieldPath, describe, format_field_path, quote_key, single_line

_MAX_NESTING = 32


class _AliasUsed(Exception):
    def __init__(self, mark: yaml.Mark):
        super().__init__("alias")
        self.mark = mark


class _StoryboardLoader(yaml.SafeLoader):
    """Safe loader that refuses aliases (``*name``) while composing, at the alias' own line."""

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            raise _AliasUsed(self.peek_event().start_mark)
        return super().compose_node(parent, index)


_TAG = "tag:yaml.org,2002:"
_CONSTRUCTED_TAGS = {_TAG + name for name in ("str", "int", "float", "bool", "null")}
_VERBATIM_TAGS = {_TAG + "timestamp", _TAG + "value"}  # kept as the text the user wrote


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


def _is_text_field(path: FieldPath) -> bool:
    """Fields whose plain YAML scalars are read as written (``title: 1984``, ``prompt: yes``).

    ``resolution`` is included so that ``resolution: 0x40`` is not read as a hexadecimal number.
    """
    return path in (("title",), ("model",), ("resolution",)) or (
        len(path) == 3 and path[0] == "prompts" and path[2] == "prompt"
    )


def _compose(text: str, source: str) -> Node | None:
    """Parse YAML text into a node tree, turning every YAML problem into a StoryboardError."""
    try:
        return yaml.compose(text, Loader=_StoryboardLoader)
    except _AliasUsed as exc:
        raise StoryboardError(
            source,
            exc.mark.line + 1,
            "YAML aliases (*name) are not supported; write the value out in full",
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(0, exc.position)) + 1
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        raise StoryboardError(
            source, line, f"invalid YAML: control character U+{code:04X} is not allowed; remove it"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "cannot parse"
        if exc.problem and exc.context:
            context = exc.context
            if exc.context_mark and mark and exc.context_mark.line != mark.line:
                context += f" (line {exc.context_mark.line + 1})"
            message = f"{context}, {exc.problem}"
        if "<block end>" in message or "<block mapping start>" in message:
            message += "; check the indentation"
        raise StoryboardError(
            source, mark.line + 1 if mark else None, single_line(f"invalid YAML: {message}")
        ) from None
    except yaml.YAMLError as exc:
        raise StoryboardError(source, None, single_line(f"invalid YAML: {exc}")) from None


class _NodeReader:
    """Converts composed YAML nodes to plain data, recording the line of every key and item."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[FieldPath, int] = {}
        self._constructor = yaml.constructor.SafeConstructor()

    def fail(self, node: Node, path: FieldPath, message: str) -> StoryboardError:
        prefix = format_field_path(path)
        text = f"{prefix}: {message}" if prefix else message
        return StoryboardError(self.source, node.start_mark.line + 1, single_line(text))

    def read(self, node: Node, path: FieldPath) -> Any:
        if len(path) > _MAX_NESTING:
            raise self.fail(node, path, "nested too deeply")
        if isinstance(node, MappingNode):
            self._check_tag(node, path, _TAG + "map")
            return self._read_mapping(node, path)
        if isinstance(node, SequenceNode):
            self._check_tag(node, path, _TAG + "seq")
            items = []
            for index, item in enumerate(node.value):
                self.lines[path + (index,)] = item.start_mark.line + 1
                items.append(self.read(item, path + (index,)))
            return items
        return self._read_scalar(node, path)

    def _check_tag(self, node: Node, path: FieldPath, *allowed: str) -> None:
        if node.tag not in allowed:
            raise self.fail(
                node,
                path,
                f"YAML tag '{_short_tag(node.tag)}' is not supported; "
                "use plain text, numbers, lists and mappings",
            )

    def _read_mapping(self, node: MappingNode, path: FieldPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                raise self.fail(
                    key_node,
                    path,
                    "YAML merge keys ('<<') are not supported; write the keys out in full",
                )
            if not isinstance(key_node, ScalarNode):
                raise self.fail(key_node, path, "keys must be plain names, not lists or mappings")
            self._check_tag(key_node, path, *_CONSTRUCTED_TAGS, *_VERBATIM_TAGS)
            key = key_node.value
            child = path + (key,)
            if key in result:
                raise self.fail(
                    key_node,
                    path,
                    f"duplicate key {quote_key(key)} (already given on line {self.lines[child]})",
                )
            self.lines[child] = key_node.start_mark.line + 1
            result[key] = self.read(value_node, child)
        return result

    def _read_scalar(self, node: ScalarNode, path: FieldPath) -> Any:
        self._check_tag(node, path, *_CONSTRUCTED_TAGS, *_VERBATIM_TAGS)
        if node.tag in _VERBATIM_TAGS:
            return node.value
        try:
            value = self._constructor.construct_object(node)
        except (ValueError, KeyError, IndexError, TypeError, OverflowError, yaml.YAMLError):
            raise self.fail(
                node, path, f"cannot read {describe(node.value)} as '{_short_tag(node.tag)}'"
            ) from None
        if _is_text_field(path) and isinstance(value, (bool, int, float)) and node.style is None:
            return node.value
        return value


def read_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[FieldPath, int]]:
    """YAML text -> (top-level mapping, line of every key path)."""
    root = _compose(text, source)
    if root is None:
        raise StoryboardError(
            source, 1, "the storyboard is empty; expected keys such as 'duration' and 'prompts'"
        )
    reader = _NodeReader(source)
    reader.lines[()] = root.start_mark.line + 1
    data = reader.read(root, ())
    if not isinstance(data, dict):
        raise StoryboardError(
            source,
            root.start_mark.line + 1,
            f"the top level must be a mapping of keys such as 'duration' and 'prompts', "
            f"got {describe(data)}",
        )
    return data, reader.lines
