"""The config: one YAML file, overridden by KEYSVC_<SECTION>__<SETTING> variables; every mistake
refused with the setting, the file and the line, and by the CLI with exit code 2, no traceback."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import msgspec
import pytest
import yaml

from keysvc.config import Config, ConfigError, from_json, load, to_json, validate

EXAMPLE = Path(__file__).resolve().parent.parent / "keysvc.example.yaml"


def write(tmp_path: Path, text: str, name: str = "keysvc.yaml") -> Path:
    path = tmp_path / name
    path.write_text(dedent(text))
    return path


def error_of(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(None if path is None else str(path), environ or {})
    return str(info.value)


# -- the file -----------------------------------------------------------------------------------

def test_a_file_sets_what_it_names_and_leaves_the_rest_at_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, """
        server:
          port: 9000
        analytics:
          flush_interval: 2          # an int where a float is expected is fine
          drain_timeout: 0           # 0: no draining at all, which is possible
          clickhouse_url: http://user:pw@clickhouse:8123/default
        metrics:
          port: null
        logging:
          format: json
    """)
    config = load(str(path), {})
    assert config.server.port == 9000
    assert config.analytics.flush_interval == 2.0
    assert config.analytics.drain_timeout == 0.0
    assert config.analytics.clickhouse_url == "http://user:pw@clickhouse:8123/default"
    assert config.metrics.port is None
    assert config.logging.format == "json"
    assert config.storage == Config().storage


@pytest.mark.parametrize("text", ["", "# only comments\n", "server:\n", "~\n"])
def test_an_empty_file_or_section_means_the_defaults(tmp_path: Path, text: str) -> None:
    assert load(str(write(tmp_path, text)), {}) == Config()


def test_no_file_means_the_defaults() -> None:
    assert load(None, {}) == Config()


def test_an_unknown_setting_is_named_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        server:
          host: 0.0.0.0
          prot: 9000
    """)
    assert error_of(path) == f"{path}:3: unknown setting `server.prot` (did you mean `server.port`?)"


def test_an_unknown_section_is_named_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {}\nstorage: {}\nsrever:\n  port: 1\n")
    assert error_of(path) == f"{path}:3: unknown section `srever` (did you mean `server`?)"


def test_an_unknown_setting_with_no_near_name_lists_the_section(tmp_path: Path) -> None:
    path = write(tmp_path, "cache:\n  zzz: 1\n")
    assert error_of(path) == f"{path}:2: unknown setting `cache.zzz` (cache has keys)"


@pytest.mark.parametrize(("line", "expected"), [
    ("port: '9000'", "server.port: expected int, got str"),
    ("port: true", "server.port: expected int, got bool"),
    ("port: 80.5", "server.port: expected int, got float"),
    ("port: [80]", "server.port: expected int, got array"),
    ("port:", "server.port: expected int, got null"),
    ("host: 8080", "server.host: expected str, got int"),
])
def test_a_wrong_type_is_named_with_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path, f"server:\n  workers: 2\n  {line}\n")
    assert error_of(path) == f"{path}:3: {expected}"


@pytest.mark.parametrize(("section", "line", "expected"), [
    ("server", "port: 0", "server.port: must be >= 1"),
    ("server", "port: 65536", "server.port: must be <= 65535"),
    ("server", "workers: -1", "server.workers: must be >= 0"),
    ("server", "max_body_bytes: 0", "server.max_body_bytes: must be >= 1"),
    ("server", "host: ''", "server.host: must not be empty"),
    ("storage", "map_size: 4096", "storage.map_size: must be >= 1048576"),
    ("storage", "counters_map_size: -1", "storage.counters_map_size: must be >= 1048576"),
    ("storage", "data_dir: ''", "storage.data_dir: must not be empty"),
    ("cache", "keys: 0", "cache.keys: must be >= 1"),
    ("analytics", "batch_size: 0", "analytics.batch_size: must be >= 1"),
    ("analytics", "flush_interval: 0", "analytics.flush_interval: must be > 0"),
    ("analytics", "query_timeout: -1.5", "analytics.query_timeout: must be > 0"),
    ("analytics", "drain_timeout: .inf", "analytics.drain_timeout: must be <= 86400"),
    ("analytics", "drain_timeout: -1", "analytics.drain_timeout: must be >= 0"),
    ("analytics", "spool_cap_bytes: 0", "analytics.spool_cap_bytes: must be >= 1"),
    ("analytics", "spool_map_size: 1", "analytics.spool_map_size: must be >= 1048576"),
    ("analytics", "clickhouse_url: ''", "analytics.clickhouse_url: must not be empty"),
    ("metrics", "port: 0", "metrics.port: must be >= 1"),
    ("metrics", "bearer_token: ''", "metrics.bearer_token: must not be empty"),
    ("logging", "format: xml", "logging.format: must be one of auto, human, json, got 'xml'"),
    ("logging", "level: verbose", "logging.level: must be one of debug, error, info, warning, got 'verbose'"),
])
def test_an_impossible_value_is_named_with_file_and_line(tmp_path: Path, section: str, line: str,
                                                         expected: str) -> None:
    path = write(tmp_path, f"{section}:\n  {line}\n")
    message = error_of(path)
    assert message.startswith(f"{path}:2: {expected}"), message


def test_a_spool_cap_past_the_spool_map_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "analytics:\n  spool_map_size: 1073741824\n  spool_cap_bytes: 1073741824\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3: analytics.spool_cap_bytes (1073741824) must be below "
                              f"analytics.spool_map_size"), message


def test_the_metrics_listener_cannot_take_the_api_port(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9000\nmetrics:\n  port: 9000\n")
    assert error_of(path).startswith(f"{path}:4: metrics.port and server.port are both 9000")
    # Apart, disabled, or on different addresses, the two can share the number.
    assert load(str(write(tmp_path, "metrics:\n  port: 8080\n  enabled: false\n")), {}).metrics.port == 8080
    assert load(str(write(tmp_path, "metrics:\n  port: 8080\n  host: 10.0.0.1\n")), {}).metrics.port == 8080
    path = write(tmp_path, "server:\n  host: 0.0.0.0\nmetrics:\n  port: 8080\n")
    assert error_of(path).startswith(f"{path}:4: metrics.port and server.port are both 8080")
    # Blamed on the setting that was set, rather than on the section of the other one.
    path = write(tmp_path, "metrics:\n  host: 127.0.0.1\nserver:\n  port: 9464\n")
    assert error_of(path).startswith(f"{path}:4: metrics.port and server.port are both 9464")


def test_a_duplicate_setting_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9000\n  port: 9001\n")
    assert error_of(path) == f"{path}:3: duplicate setting `server.port` (first set at line 2)"


def test_a_duplicate_section_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9000\ncache: {}\nserver:\n  host: 0.0.0.0\n")
    assert error_of(path) == f"{path}:4: duplicate section `server` (first set at line 1)"


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("server:\n  host: a: b\n", 2, "mapping values are not allowed here"),
    ("server:\n  port: [8080\ncache: {}\n", 3, "while parsing a flow sequence (line 2)"),
    ("server:\n\tport: 1\n", 2, "found character '\\t' that cannot start any token"),
    ("server: {}\n---\ncache: {}\n", 2, "but found another document"),
    ("server:\n  port: *nowhere\n", 2, "found undefined alias 'nowhere'"),
])
def test_a_yaml_syntax_error_gives_file_and_line(tmp_path: Path, text: str, line: int, problem: str) -> None:
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}:{line}: invalid YAML: ") and problem in message, message


@pytest.mark.parametrize(("text", "line", "expected"), [
    ("- server\n- cache\n", 1, "the top level must be a mapping of sections"),
    ("\n\nport\n", 3, "the top level must be a mapping of sections"),
    ("server: 8080\n", 1, "server: expected a mapping of settings, got `8080`"),
    ("cache:\n  - keys\n", 2, "cache: expected a mapping of settings, got a list"),
    ("server:\n  [port]: 1\n", 2, "a setting name must be a plain word, got a list"),
])
def test_a_misshapen_file_is_refused(tmp_path: Path, text: str, line: int, expected: str) -> None:
    path = write(tmp_path, text)
    assert error_of(path).startswith(f"{path}:{line}: {expected}")


def test_python_tags_are_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = write(tmp_path, f"server:\n  host: !!python/object/apply:os.system ['touch {marker}']\n")
    message = error_of(path)
    assert message.startswith(f"{path}:2: server.host: could not determine a constructor"), message
    assert not marker.exists()


def test_an_invalid_tagged_value_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: !!int eighty\n")
    assert error_of(path).startswith(f"{path}:2: server.port: invalid YAML value: ")


def test_a_control_character_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 1\n  host: a\x07b\n")
    assert error_of(path) == f"{path}:3: invalid YAML: character #x0007 is not allowed"


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    assert error_of(path) == f"{path}: cannot read the config file: No such file or directory"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert error_of(tmp_path).startswith(f"{tmp_path}: cannot read the config file: ")


def test_a_file_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keysvc.yaml"
    path.write_bytes(b"server:\n  host: caf\xe9\n")
    assert error_of(path).startswith(f"{path}:2: not UTF-8 text")


# -- environment variables ----------------------------------------------------------------------

def test_an_environment_variable_beats_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  host: 0.0.0.0\n  port: 9000\n")
    config = load(str(path), {"KEYSVC_SERVER__PORT": "9100"})
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9100)


def test_environment_variables_apply_without_a_file() -> None:
    config = load(None, {
        "KEYSVC_SERVER__WORKERS": "3",
        "KEYSVC_ANALYTICS__ENABLED": "false",
        "KEYSVC_ANALYTICS__FLUSH_INTERVAL": "0.5",
        "KEYSVC_ANALYTICS__CLICKHOUSE_URL": "http://user:pw@clickhouse:8123/default",
        "KEYSVC_METRICS__PORT": "null",
        "KEYSVC_LOGGING__LEVEL": "debug",
    })
    assert config.server.workers == 3
    assert config.analytics.enabled is False
    assert config.analytics.flush_interval == 0.5
    assert config.analytics.clickhouse_url == "http://user:pw@clickhouse:8123/default"
    assert config.metrics.port is None
    assert config.logging.level == "debug"


def test_a_text_setting_keeps_the_text_of_its_variable() -> None:
    # Read as YAML these would be an int, a bool, a comment and a mapping.
    for token in ("12345", "true", "#s3cret", "a: b"):
        config = load(None, {"KEYSVC_METRICS__BEARER_TOKEN": token})
        assert config.metrics.bearer_token == token


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSVC_CACHE__KEYS", "1000")
    assert load(None).cache.keys == 1000


def test_keysvc_variables_without_a_double_underscore_are_not_settings() -> None:
    environ = {"KEYSVC_NO_EXTENSIONS": "1", "KEYSVC_CONFIG_JSON": "{", "KEYSVC_ANALYTICS_CRASH_AT": "x",
               "OTHER__THING": "1"}
    assert load(None, environ) == Config()


@pytest.mark.parametrize(("name", "expected"), [
    ("KEYSVC_SERVER__PROT", "unknown setting `server.prot` (did you mean `server.port`?)"),
    ("KEYSVC_SERVR__PORT", "unknown setting `servr.port` (did you mean `server.port`?)"),
    ("KEYSVC_SERVER__PORT__X", "unknown setting `server.port__x`"),
    ("KEYSVC_FOO__BAR", "unknown setting `foo.bar` (the sections are server, storage, cache, analytics, "
                        "metrics, logging)"),
])
def test_an_unknown_variable_is_named(name: str, expected: str) -> None:
    assert error_of(None, {name: "1"}).startswith(f"environment variable {name}: {expected}")


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("KEYSVC_SERVER__PORT", "http", "expected int, got str"),
    ("KEYSVC_SERVER__PORT", "0", "must be >= 1"),
    ("KEYSVC_SERVER__PORT", "", "expected int, got null"),
    ("KEYSVC_ANALYTICS__ENABLED", "maybe", "expected bool, got str"),
    ("KEYSVC_LOGGING__FORMAT", "xml", "must be one of auto, human, json, got 'xml'"),
])
def test_a_bad_variable_value_names_the_variable(tmp_path: Path, name: str, value: str, expected: str) -> None:
    # The variable is blamed even where the file sets the same setting.
    path = write(tmp_path, "server:\n  port: 9000\n")
    assert error_of(path, {name: value}) == f"environment variable {name}: {expected}"


def test_a_conflict_is_blamed_on_the_variable_that_made_it() -> None:
    message = error_of(None, {"KEYSVC_METRICS__PORT": "8080"})
    assert message.startswith("environment variable KEYSVC_METRICS__PORT: metrics.port and server.port")


# -- the example file ---------------------------------------------------------------------------

def test_the_example_file_is_exactly_the_defaults() -> None:
    assert load(str(EXAMPLE), {}) == Config()


def test_the_example_file_names_every_setting_of_every_section() -> None:
    written = yaml.safe_load(EXAMPLE.read_text())
    sections = {f.name: f.type for f in msgspec.structs.fields(Config)}
    assert list(written) == list(sections)
    for name, section in sections.items():
        assert list(written[name]) == [f.name for f in msgspec.structs.fields(section)], name


def test_the_example_file_explains_every_setting() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s+\w+:", line):
            assert lines[number - 1].lstrip().startswith("#") or " # " in line, f"line {number + 1}: {line}"


# -- JSON, and checks after the fact --------------------------------------------------------------

def test_json_round_trips() -> None:
    config = load(None, {"KEYSVC_SERVER__PORT": "9000", "KEYSVC_METRICS__BEARER_TOKEN": "t"})
    assert from_json(to_json(config)) == config
    assert from_json(to_json(config).decode()) == config


@pytest.mark.parametrize(("data", "expected"), [
    (json.dumps({"server": {"port": 0}}), "config JSON: server.port: must be >= 1"),
    ("{", "config JSON: "),
])
def test_bad_json_is_a_config_error(data: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        from_json(data)


def test_validate_rechecks_settings_assigned_after_loading() -> None:
    config = load(None, {})
    assert validate(config) is config
    config.server.port = 70000
    with pytest.raises(ConfigError, match=re.escape("server.port: must be <= 65535")):
        validate(config)
    config.server.port = 9464
    with pytest.raises(ConfigError, match="metrics.port and server.port are both 9464"):
        validate(config)


# -- through the CLI ----------------------------------------------------------------------------

def keysvc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keysvc", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize(("text", "env", "expected"), [
    ("server:\n  host: 0.0.0.0\n  prot: 9000\n", {}, "{path}:3: unknown setting `server.prot`"),
    ("server:\n  port: 9000\n", {"KEYSVC_SERVER__PORT": "nine"},
     "environment variable KEYSVC_SERVER__PORT: expected int, got str"),
], ids=["file", "environment"])
def test_the_cli_refuses_a_bad_config_with_exit_code_2(tmp_path: Path, text: str, env: dict[str, str],
                                                       expected: str) -> None:
    path = write(tmp_path, text)
    done = keysvc("doctor", "--config", str(path), "--data-dir", str(tmp_path / "data"), env=env)
    assert done.returncode == 2, done
    assert done.stderr.startswith("keysvc: error: " + expected.format(path=path)), done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()


def test_the_cli_uses_the_file_and_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "storage:\n  map_size: 16777216\n  counters_map_size: 16777216\n")
    done = keysvc("doctor", "--json", "--config", str(path), "--data-dir", str(tmp_path / "data"),
                  env={"KEYSVC_STORAGE__COUNTERS_MAP_SIZE": "8388608"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["store_map_size_bytes"] == 16 << 20
    assert report["counters_map_size_bytes"] == 8 << 20


def test_the_readme_example_config_is_valid(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", readme, re.S)
    assert block is not None
    path = tmp_path / "readme.yaml"
    path.write_text(block.group(1))
    config = load(str(path), {})
    assert config.server.host == "0.0.0.0" and config.analytics.clickhouse_url
