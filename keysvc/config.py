"""keysvc's settings: typed, with defaults that serve on a single node with nothing else
installed. They come from one YAML file, then from KEYSVC_<SECTION>__<SETTING> environment
variables, then (in keysvc/cli/common.py) from command-line flags, each beating the one before.
keysvc.example.yaml, at the repository root, lists every setting with its default.

Everything a user can get wrong is refused by `load` with a ConfigError whose message names the
setting and where it came from (`keysvc.yaml:3: server.port: must be <= 65535`), so that the CLI
prints one line and exits non-zero instead of a traceback."""
from __future__ import annotations

import contextlib
import difflib
import functools
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Literal, NamedTuple, Protocol

import msgspec
import yaml
from msgspec import Meta

MiB = 1 << 20
GiB = 1 << 30
DAY = 86_400.0

Port = Annotated[int, Meta(ge=1, le=65535)]
Count = Annotated[int, Meta(ge=1)]
Bytes = Annotated[int, Meta(ge=1)]
# An LMDB map this small fills up after a handful of records: a value below it is a unit mistaken.
MapSize = Annotated[int, Meta(ge=MiB)]
# The upper bound also refuses .inf, which a ClickHouse timeout or a sleep cannot take.
Seconds = Annotated[float, Meta(gt=0, le=DAY)]
SecondsOrZero = Annotated[float, Meta(ge=0, le=DAY)]  # where 0 means "not at all"
Text = Annotated[str, Meta(min_length=1)]


class ConfigError(Exception):
    """A config that cannot be used; the message names the setting and where it came from."""


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: Text = "127.0.0.1"
    port: Port = 8080
    workers: Annotated[int, Meta(ge=0)] = 0  # 0: one per CPU
    max_body_bytes: Bytes = 1 << 20


class StorageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: Text = "./keysvc-data"
    map_size: MapSize = 64 * GiB
    counters_map_size: MapSize = 8 * GiB


class CacheConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    keys: Count = 200_000  # decoded key records per worker


class AnalyticsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    # None: the embedded chDB engine, under <data_dir>/chdb. Else a ClickHouse server, e.g.
    # http://user:password@clickhouse:8123/default.
    clickhouse_url: Text | None = None
    batch_size: Count = 10_000  # rows per insert
    flush_interval: Seconds = 5.0  # seconds: a smaller batch goes after this long
    # Seconds between two rollups (keysvc.analytics.rollups) while the spool is never empty; at
    # once when it is. The *_per_*_v1 aliases lag the raw tables by at most this much.
    rollup_interval: Seconds = 10.0
    spool_cap_bytes: Bytes = 1 * GiB  # past it the oldest events are dropped (and counted)
    spool_map_size: MapSize = 4 * GiB
    query_timeout: Seconds = 10.0  # seconds, for analytics.get* queries
    # Seconds the flusher may keep flushing after SIGTERM; 0: none, everything stays spooled.
    drain_timeout: SecondsOrZero = 10.0


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Prometheus metrics. Scrapers reach them on a listener of their own, so that /metrics is
    never exposed where the API is unless a token guards it."""
    enabled: bool = True
    host: Text = "127.0.0.1"  # the separate metrics listener's address
    port: Port | None = 9464  # GET /metrics on its own port; None: no separate listener
    # When set, GET /metrics is also served on the API port, to callers presenting this bearer token.
    bearer_token: Text | None = None


class LoggingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    format: Literal["auto", "json", "human"] = "auto"  # auto: human on a TTY, JSON lines otherwise
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = True  # one access line per request


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    analytics: AnalyticsConfig = msgspec.field(default_factory=AnalyticsConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)

    def workers(self) -> int:
        return self.server.workers or os.cpu_count() or 1


def load(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Config:
    """The config of the YAML file at `path` (None: no file, the defaults), overridden by the
    KEYSVC_<SECTION>__<SETTING> variables of `environ` (default: os.environ)."""
    file = None if path is None else os.fspath(path)
    tree, origins = _read_file(file) if file is not None else ({}, {})
    _apply_environ(os.environ if environ is None else environ, tree, origins)
    fallback = _Line(file or "config", None)
    try:
        config = msgspec.convert(tree, Config)
    except msgspec.ValidationError as exc:
        setting, problem = _split(exc)
        origin = _origin_of(origins, setting) or fallback
        raise ConfigError(origin.explain(".".join(setting), problem)) from None
    for conflict in _conflicts(config):
        raise ConfigError((_blame(origins, conflict.paths) or fallback).explain(None, conflict.problem))
    return config


def validate(config: Config) -> Config:
    """`config` itself once its settings are checked again: assigning to a Struct's field (as the
    CLI does with its flags) skips the checks `load` made."""
    try:
        msgspec.convert(msgspec.to_builtins(config), Config)
    except msgspec.ValidationError as exc:
        path, problem = _split(exc)
        raise ConfigError(f"{'.'.join(path)}: {problem}") from None
    for conflict in _conflicts(config):
        raise ConfigError(conflict.problem)
    return config


def to_json(config: Config) -> bytes:
    return msgspec.json.encode(config)


def from_json(data: bytes | str) -> Config:
    try:
        return msgspec.json.decode(data, type=Config)
    except msgspec.ValidationError as exc:
        path, problem = _split(exc)
        raise ConfigError(f"config JSON: {'.'.join(path)}: {problem}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config JSON: {exc}") from None


# -- where a value came from --------------------------------------------------------------------

class _Origin(Protocol):
    def explain(self, setting: str | None, problem: str) -> str: ...


class _Line(NamedTuple):
    file: str
    line: int | None  # 1-based; None: the file as a whole

    def explain(self, setting: str | None, problem: str) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {setting}: {problem}" if setting else f"{where}: {problem}"


class _Variable(NamedTuple):
    name: str

    def explain(self, setting: str | None, problem: str) -> str:
        # The variable's name already spells the setting.
        return f"environment variable {self.name}: {problem}"


_Tree = dict[str, dict[str, object]]  # section -> setting -> value, as YAML or env gave it
_Origins = dict[tuple[str, ...], _Origin]  # (section,) or (section, setting) -> where it was set


def _origin_of(origins: _Origins, path: tuple[str, ...]) -> _Origin | None:
    for end in range(len(path), 0, -1):
        if path[:end] in origins:
            return origins[path[:end]]
    return None


def _blame(origins: _Origins, paths: tuple[tuple[str, ...], ...]) -> _Origin | None:
    """Where the first of `paths` that was set was set, else the section of the first one there."""
    exact = (origins.get(path) for path in paths)
    near = (_origin_of(origins, path) for path in paths)
    return next(filter(None, exact), None) or next(filter(None, near), None)


@functools.cache
def _schema() -> dict[str, dict[str, msgspec.inspect.Type]]:
    """section -> setting -> its type, constraints included."""
    root = msgspec.inspect.type_info(Config)
    assert isinstance(root, msgspec.inspect.StructType)
    schema: dict[str, dict[str, msgspec.inspect.Type]] = {}
    for section in root.fields:
        assert isinstance(section.type, msgspec.inspect.StructType)
        schema[section.name] = {setting.name: setting.type for setting in section.type.fields}
    return schema


def _unknown(section: str, setting: str | None) -> str:
    """'unknown setting `server.prot` (did you mean `server.port`?)', or the names there are."""
    schema = _schema()
    sections = "the sections are " + ", ".join(schema)
    if setting is None:
        return f"unknown section `{section}` ({_hint(section, list(schema), '', sections)})"
    if section in schema:
        names = list(schema[section])
        hint = _hint(setting, names, f"{section}.", f"{section} has " + ", ".join(names))
    else:
        dotted = [f"{sec}.{name}" for sec in schema for name in schema[sec]]
        hint = _hint(f"{section}.{setting}", dotted, "", sections)
    return f"unknown setting `{section}.{setting}` ({hint})"


def _hint(name: str, known: list[str], prefix: str, otherwise: str) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean `{prefix}{close[0]}`?" if close else otherwise


# -- the YAML file ------------------------------------------------------------------------------

_NULL = "tag:yaml.org,2002:null"


def _read_file(file: str) -> tuple[_Tree, _Origins]:
    text = _read_text(file)
    # One loader composes the nodes (whose marks give line numbers) and constructs the values.
    with _yaml_errors(file, text):
        loader = yaml.SafeLoader(text)  # which already checks every character
    try:
        with _yaml_errors(file, text):
            root = loader.get_single_node()
        return _file_tree(loader, file, root)
    finally:
        loader.dispose()


def _read_text(file: str) -> str:
    try:
        raw = Path(file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{file}:{line}: not UTF-8 text ({exc.reason})") from None


@contextlib.contextmanager
def _yaml_errors(file: str, text: str) -> Iterator[None]:
    try:
        yield
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_yaml_problem(file, exc)) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"{file}:{line}: invalid YAML: character #x{exc.character:04x} "
                          f"is not allowed") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{file}: invalid YAML: nested too deeply") from None


def _yaml_problem(file: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"{file}:{mark.line + 1}" if mark else file
    problem = exc.problem or exc.context or "cannot be parsed"
    if exc.problem and exc.context:
        # PyYAML's context is the construct it was in ("while parsing a block mapping"),
        # which may start lines above the problem.
        line = f" (line {exc.context_mark.line + 1})" if exc.context_mark else ""
        problem = f"{exc.context}{line}: {problem}"
    return f"{where}: invalid YAML: {problem}"


def _file_tree(loader: yaml.SafeLoader, file: str, root: yaml.Node | None) -> tuple[_Tree, _Origins]:
    tree: _Tree = {}
    origins: _Origins = {}
    if root is None or _is_null(root):  # an empty file, or only comments: the defaults
        return tree, origins
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{file}:{_line(root)}: the top level must be a mapping of sections "
                          f"(server:, storage:, ...), got {_kind(root)}")
    for section, key, value in _entries(file, root, prefix=""):
        if section not in _schema():
            raise ConfigError(f"{file}:{_line(key)}: {_unknown(section, None)}")
        origins[(section,)] = _Line(file, _line(key))
        tree[section] = _section(loader, file, section, value, origins)
    return tree, origins


def _section(loader: yaml.SafeLoader, file: str, section: str, node: yaml.Node,
             origins: _Origins) -> dict[str, object]:
    settings: dict[str, object] = {}
    if _is_null(node):  # `server:` with every setting under it commented out
        return settings
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{file}:{_line(node)}: {section}: expected a mapping of settings, "
                          f"got {_kind(node)}")
    for setting, key, value in _entries(file, node, prefix=f"{section}."):
        if setting not in _schema()[section]:
            raise ConfigError(f"{file}:{_line(key)}: {_unknown(section, setting)}")
        origins[(section, setting)] = _Line(file, _line(value))
        settings[setting] = _construct(loader, file, f"{section}.{setting}", value)
    return settings


def _entries(file: str, node: yaml.MappingNode, prefix: str) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
    """(name, key node, value node) of each entry, refusing a duplicate name: PyYAML would
    silently keep the last one, and the other would look set but have no effect."""
    kind = "setting" if prefix else "section"
    seen: dict[str, int] = {}
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            raise ConfigError(f"{file}:{_line(key)}: a {kind} name must be a plain word, got {_kind(key)}")
        if key.value in seen:
            raise ConfigError(f"{file}:{_line(key)}: duplicate {kind} `{prefix}{key.value}` "
                              f"(first set at line {seen[key.value]})")
        seen[key.value] = _line(key)
        yield key.value, key, value


def _construct(loader: yaml.SafeLoader, file: str, setting: str, node: yaml.Node) -> object:
    try:
        return loader.construct_object(node, deep=True)
    except yaml.MarkedYAMLError as exc:  # e.g. a tag SafeLoader refuses, like !!python/object
        raise ConfigError(f"{file}:{_line(node)}: {setting}: {exc.problem or exc.context}") from None
    except (ValueError, TypeError, ArithmeticError) as exc:  # e.g. `!!int abc`, `!!timestamp 2024-13-45`
        raise ConfigError(f"{file}:{_line(node)}: {setting}: invalid YAML value: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{file}:{_line(node)}: {setting}: nested too deeply") from None


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"`{node.value}`"


# -- environment variables ----------------------------------------------------------------------

_PREFIX = "KEYSVC_"
_SEPARATOR = "__"  # KEYSVC_ variables without it (KEYSVC_NO_EXTENSIONS, ...) are keysvc's own


def _apply_environ(environ: Mapping[str, str], tree: _Tree, origins: _Origins) -> None:
    schema = _schema()
    for name in sorted(environ):
        if not name.startswith(_PREFIX) or _SEPARATOR not in name:
            continue
        section, _, setting = name[len(_PREFIX):].lower().partition(_SEPARATOR)
        if setting not in schema.get(section, {}):
            raise ConfigError(f"environment variable {name}: {_unknown(section, setting)}")
        tree.setdefault(section, {})[setting] = _env_value(environ[name], schema[section][setting])
        origins[(section, setting)] = _Variable(name)


def _env_value(text: str, kind: msgspec.inspect.Type) -> object:
    """The value of a variable, read as a YAML scalar (9000 an int, true a bool, null None),
    except that a text-only setting keeps the text: a token of digits is still a string."""
    text = text.strip()
    value = _yaml_scalar(text)
    if value is not None and not isinstance(value, str) and _text_only(kind):
        return text
    return value


def _yaml_scalar(text: str) -> object:
    # The text as one plain YAML scalar. yaml.safe_load would read more into it: `#x` as a
    # comment (None), `a: b` as a mapping.
    loader = yaml.SafeLoader("")
    try:
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))
        return loader.construct_object(yaml.ScalarNode(tag, text))
    except (yaml.YAMLError, ValueError, TypeError, ArithmeticError):
        return text  # e.g. `2024-13-45`, which looks like a timestamp but is none
    finally:
        loader.dispose()


def _text_only(kind: msgspec.inspect.Type) -> bool:
    members = kind.types if isinstance(kind, msgspec.inspect.UnionType) else (kind,)
    text = (msgspec.inspect.StrType, msgspec.inspect.LiteralType)
    nothing_else = all(isinstance(m, (*text, msgspec.inspect.NoneType)) for m in members)
    return nothing_else and any(isinstance(m, text) for m in members)


# -- msgspec's errors, said plainly -------------------------------------------------------------

_AT = re.compile(r"(?s)(.*) - at `\$((?:\.\w+)*)`")


def _split(exc: msgspec.ValidationError) -> tuple[tuple[str, ...], str]:
    """The setting's path (("server", "port")) and the problem, reworded, of msgspec's
    "Expected `int` <= 65535 - at `$.server.port`"."""
    match = _AT.fullmatch(str(exc))
    if match is None:
        return (), _reword(str(exc), None)
    path = tuple(match[2].split(".")[1:])
    kind = _schema().get(path[0], {}).get(path[1]) if len(path) == 2 else None
    return path, _reword(match[1], kind)


def _reword(problem: str, kind: msgspec.inspect.Type | None) -> str:
    if match := re.fullmatch(r"Expected `([^`]+)`, got `([^`]+)`", problem):
        return f"expected {match[1]}, got {match[2]}"
    if re.fullmatch(r"Expected `[^`]+` of length >= 1", problem):
        return "must not be empty"
    if match := re.fullmatch(r"Expected `[^`]+` of length (.+)", problem):
        return f"length must be {match[1]}"
    if match := re.fullmatch(r"Expected `[^`]+` (.+)", problem):
        return f"must be {match[1]}"
    if (match := re.fullmatch(r"Invalid enum value (.+)", problem)) and \
            isinstance(kind, msgspec.inspect.LiteralType):
        return f"must be one of {', '.join(map(str, kind.values))}, got {match[1]}"
    return problem[:1].lower() + problem[1:]


# -- settings that are fine alone but not together ----------------------------------------------

class _Conflict(NamedTuple):
    paths: tuple[tuple[str, str], ...]  # the settings involved; the first one set gets the blame
    problem: str


_ANY_HOST = {"0.0.0.0", "::", "[::]"}


def _conflicts(config: Config) -> Iterator[_Conflict]:
    analytics, metrics, server = config.analytics, config.metrics, config.server
    if analytics.spool_cap_bytes >= analytics.spool_map_size:
        yield _Conflict(
            (("analytics", "spool_cap_bytes"), ("analytics", "spool_map_size")),
            f"analytics.spool_cap_bytes ({analytics.spool_cap_bytes}) must be below analytics.spool_map_size "
            f"({analytics.spool_map_size}): the spool would fill up before the cap drops old events")
    hosts = {metrics.host, server.host}
    if metrics.enabled and metrics.port == server.port and (len(hosts) == 1 or hosts & _ANY_HOST):
        yield _Conflict(
            (("metrics", "port"), ("server", "port")),
            f"metrics.port and server.port are both {server.port}: the metrics listener needs a port "
            f"of its own (or metrics.port: null, and metrics.bearer_token to serve /metrics on the API port)")
