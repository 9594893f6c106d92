"""YAML documents with the line of every key, so errors can name `FILE:LINE: key.path`.

PyYAML composes nodes (which carry marks); we build plain Python values from them ourselves so that
duplicate keys, unsafe tags and alias bombs become validation errors instead of surprises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from lmstack.manifests.errors import ManifestError

Path = tuple[str | int, ...]
_MAX_NODES = 200_000  # guards against alias expansion bombs
_MAX_DEPTH = 100  # far deeper than any manifest; PyYAML's composer recurses (RecursionError near 300)


@dataclass
class Document:
    """One YAML document: its data and the 1-based line of each key path in it.

    Where the YAML was rejected but reading went on, schema errors would only be noise: `unreadable`
    holds the paths whose value was dropped (unsupported tag), `incomplete` the mappings that may lack
    keys (a merge key, a complex key) so that "is required" there means nothing.
    """

    file: str
    index: int
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    unreadable: set[Path] = field(default_factory=set)
    incomplete: set[Path] = field(default_factory=set)

    def is_readable(self, path: Path) -> bool:
        return not any(path[:end] in self.unreadable for end in range(len(path) + 1))

    def may_lack(self, path: Path) -> bool:
        """Whether the key at `path` may be missing only because its mapping was not fully read."""
        return path[:-1] in self.incomplete or not self.is_readable(path[:-1])

    def line_of(self, path: Path) -> int:
        """The line of the deepest prefix of `path` that exists (a missing key points at its parent)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return 1


class _Builder:
    def __init__(self, document: Document) -> None:
        self.document = document
        self.errors: list[ManifestError] = []
        self.nodes = 0
        self._scalars = yaml.SafeLoader("")
        self._open: set[int] = set()  # the collections being built: an alias to one of them is a cycle

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise _TooLarge(node.start_mark.line + 1)
        self.document.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            if id(node) in self._open:
                self._error(node, path, "YAML alias refers to a node that contains it")
                self.document.unreadable.add(path)
                return None
            self._open.add(id(node))
            try:
                return self._collection(node, path)
            finally:
                self._open.discard(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                return self._scalars.construct_object(node, deep=True)
            except yaml.constructor.ConstructorError:
                self._error(node, path, _unsupported(node.tag))
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
                # An explicit tag on a value that does not fit it (`!!int two`, `!!bool maybe`), or a
                # number with more digits than Python converts.
                shown = repr(node.value) if len(node.value) <= 40 else repr(node.value[:37]) + "..."
                too_long = node.tag.endswith((":int", ":float")) and len(node.value) > 100
                self._error(node, path, f"{shown} is too long for a number" if too_long
                            else f"{shown} is not a valid {_tag(node.tag)}")
            self.document.unreadable.add(path)
            return None
        self._error(node, path, "unsupported YAML node")
        return None

    def _collection(self, node: yaml.MappingNode | yaml.SequenceNode, path: Path) -> Any:
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if node.tag != "tag:yaml.org,2002:seq":
            self._error(node, path, _unsupported(node.tag))
            self.document.unreadable.add(path)
            return None
        return [self.build(item, (*path, index)) for index, item in enumerate(node.value)]

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any] | None:
        if node.tag != "tag:yaml.org,2002:map":
            self._error(node, path, _unsupported(node.tag))
            self.document.unreadable.add(path)
            return None
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._error(key_node, path, "YAML merge keys (<<) are not supported; write the keys out")
                self.document.incomplete.add(path)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._error(key_node, path, "mapping keys must be plain strings")
                self.document.incomplete.add(path)
                continue
            key = self.build(key_node, (*path, "\0key"))
            if not isinstance(key, str):
                key = str(key)  # `1: x` or `true: x` as a key; the schema will reject it by name
            child = (*path, key)
            if key in result:
                self._error(key_node, child, f"duplicate key (first on line {self.document.lines[child]})")
                continue
            self.document.lines[child] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, child)
        return result

    def _error(self, node: yaml.Node, path: Path, message: str) -> None:
        self.errors.append(ManifestError(self.document.file, node.start_mark.line + 1, dotted(path), message))


def _tag(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag


def _unsupported(tag: str) -> str:
    return f"YAML tag {_tag(tag)} is not supported (use plain strings, numbers, lists and mappings)"


class _TooLarge(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _Loader(yaml.SafeLoader):
    """SafeLoader whose (recursive) composer refuses nesting deeper than _MAX_DEPTH, quickly."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark.line + 1)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dotted(path: Path) -> str:
    """`spec.args[2]`, the way users write key paths; `labels["lmstack.dev/rack"]` for keys with dots."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part == "\0key":
            continue
        elif _PLAIN_KEY.fullmatch(part) is None:
            text += f"[{json.dumps(part, ensure_ascii=False)}]"
        else:
            text += f".{part}" if text else part
    return text


def load_documents(file: str, text: str | bytes) -> tuple[list[Document], list[ManifestError]]:
    """Every non-empty document in `text`, and the errors found reading it.

    A syntax error stops the whole file (nothing after it can be trusted). Other YAML errors (duplicate
    keys, tags) are reported and the document is still returned, its `unreadable` paths marked, so that
    the rest of it is checked too.
    """
    documents: list[Document] = []
    errors: list[ManifestError] = []
    try:
        nodes = list(_compose_all(text))
    except yaml.MarkedYAMLError as exc:
        line, path, message = _syntax_error(exc)
        # A problem found at the end of the stream sits after the last newline: name the last line.
        last = len(text.splitlines()) or 1
        return [], [ManifestError(file, min(line, last), path, message)]
    except yaml.reader.ReaderError as exc:
        return [], [_reader_error(file, text, exc)]
    except yaml.YAMLError as exc:
        return [], [ManifestError(file, 1, "", f"YAML error: {exc}")]
    except UnicodeDecodeError:
        return [], [ManifestError(file, 1, "", "not UTF-8 text")]
    except _TooDeep as exc:
        return [], [_too_deep(file, exc.line)]
    except RecursionError:
        return [], [ManifestError(file, 1, "", "YAML is nested too deeply")]
    for index, node in enumerate(nodes):
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"):
            continue  # an empty document: `---` twice, a trailing `---`, only comments
        document = Document(file=file, index=index, data=None)
        builder = _Builder(document)
        try:
            document.data = builder.build(node, ())
        except _TooLarge as exc:
            errors.append(_too_large(file, node, exc.line))
            continue
        except RecursionError:
            errors.append(ManifestError(file, node.start_mark.line + 1, "", "document is nested too deeply"))
            continue
        errors.extend(builder.errors)
        documents.append(document)
    return documents, errors


def limit_errors(file: str, text: str | bytes) -> list[ManifestError]:
    """Only the limits `load_documents` enforces (alias expansion, nesting), for YAML that another parser reads
    next without such limits (ansible's, for the inventory). Syntax and tag errors are left to that parser:
    YAML it cannot read, it cannot expand either."""
    try:
        nodes = list(_compose_all(text))
    except _TooDeep as exc:
        return [_too_deep(file, exc.line)]
    except RecursionError:
        return [ManifestError(file, 1, "", "YAML is nested too deeply")]
    except (yaml.YAMLError, UnicodeDecodeError):
        return []
    errors = []
    for node in nodes:
        if node is None:
            continue
        try:
            _Builder(Document(file=file, index=0, data=None)).build(node, ())
        except _TooLarge as exc:
            errors.append(_too_large(file, node, exc.line))
        except RecursionError:
            errors.append(ManifestError(file, node.start_mark.line + 1, "", "document is nested too deeply"))
    return errors


def _too_deep(file: str, line: int) -> ManifestError:
    return ManifestError(file, line, "", f"YAML is nested more than {_MAX_DEPTH} levels deep")


def _too_large(file: str, node: yaml.Node, line: int) -> ManifestError:
    return ManifestError(file, node.start_mark.line + 1, "",
                         f"document has more than {_MAX_NODES} values once its aliases are expanded (the limit was "
                         f"passed on line {line})")


def _reader_error(file: str, text: str | bytes, exc: yaml.reader.ReaderError) -> ManifestError:
    if exc.encoding == "unicode":  # a decoded character YAML forbids; position counts characters
        decoded = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        line = decoded[: exc.position].count("\n") + 1
        return ManifestError(file, line, "", f"character #x{exc.character:04x} is not allowed in YAML "
                                             "(write it as an escape in a double-quoted string)")
    raw = text if isinstance(text, bytes) else text.encode()
    line = raw[: exc.position].count(b"\n") + 1
    return ManifestError(file, line, "", f"not {exc.encoding} text ({exc.reason})")


def _syntax_error(exc: yaml.MarkedYAMLError) -> tuple[int, str, str]:
    """(line, path, message) for a YAML syntax error.

    PyYAML gives the problem's place and often a context (`while parsing a flow sequence` at the `[`).
    An unclosed bracket or quote is only noticed later (at a `:` on a following line, or at the end of
    the file), so for those the line to fix is the context's: where the bracket or quote opened.
    """
    problem = exc.problem or exc.context or "invalid YAML"
    mark = exc.problem_mark or exc.context_mark
    context, context_text = exc.context_mark, exc.context or ""
    unclosed = "flow" in context_text or "quoted scalar" in context_text
    at_end = "end of stream" in problem or "<stream end>" in problem
    if context is not None and context_text and (unclosed or at_end or mark is None):
        if mark is not None and mark.line != context.line and not at_end:
            problem += f" on line {mark.line + 1}"
        return context.line + 1, "", f"YAML syntax error: {problem} ({context_text} started here)"
    line = mark.line + 1 if mark is not None else 1
    if context is not None and context_text and mark is not None and context.line != mark.line:
        problem += f" ({context_text} on line {context.line + 1})"
    return line, "", f"YAML syntax error: {problem}{_HINTS.get(exc.problem or '', '')}"


# PyYAML's most puzzling messages, with what usually causes them.
_HINTS = {
    "mapping values are not allowed here":
        " (check this line's indentation, or quote a value that contains ': ')",
    "found character '\\t' that cannot start any token": " (indent with spaces: YAML does not allow tabs)",
}


def _compose_all(text: str | bytes) -> Iterator[yaml.Node | None]:
    loader = _Loader(text)
    try:
        while loader.check_node():
            yield loader.get_node()
    finally:
        loader.dispose()
