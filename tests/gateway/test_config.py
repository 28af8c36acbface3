"""Settings loading: source precedence, upstream parsing, env expansion, and error messages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    ConfigError,
    GatewaySettings,
    HealthSettings,
    Strategy,
    UpstreamSettings,
    expand_env_refs,
    load_settings,
    parse_upstream_spec,
    read_yaml_config,
)

ONE = {"upstreams": ["http://10.0.0.1:8000"]}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No GATEWAY_* variable (or secret used below) from the real environment leaks in."""
    for key in list(os.environ):
        if key.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(key)
    for key in ("GW_TEST_TOKEN", "GW_TEST_TEAM"):
        monkeypatch.delenv(key, raising=False)
    yield


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults and precedence ---------------------------------------------------------------


def test_load_settings_defaults() -> None:
    s = load_settings(ONE)
    assert type(s) is GatewaySettings
    assert s.strategy is Strategy.LATENCY
    assert (s.host, s.port, s.admin_port) == ("127.0.0.1", 8080, 9901)
    assert s.retry.max_attempts == 3
    assert s.retry.on_statuses == frozenset({429, 500, 502, 503, 504})
    assert s.outlier.base_ejection_s == 30.0
    assert s.outlier.max_ejection_s == 300.0
    assert s.health.unhealthy_threshold == 3
    assert s.health.healthy_threshold == 2
    assert s.timeouts.deadline_s is None
    assert s.admin_token is None


def test_load_settings_equal_inputs_give_equal_settings() -> None:
    assert load_settings(ONE) == load_settings(ONE)


def test_load_settings_result_is_frozen() -> None:
    s = load_settings(ONE)
    with pytest.raises(ValueError):
        s.port = 1  # type: ignore[misc]


def test_precedence_yaml_over_defaults(tmp_path: Path) -> None:
    cfg = write(tmp_path, "upstreams: ['http://y:1']\nstrategy: round_robin\n")
    s = load_settings(config_file=cfg)
    assert s.strategy is Strategy.ROUND_ROBIN
    assert [u.url for u in s.upstreams] == ["http://y:1"]


def test_precedence_env_over_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, "upstreams: ['http://y:1']\nstrategy: round_robin\nport: 9000\n")
    monkeypatch.setenv("GATEWAY_STRATEGY", "least_inflight")
    s = load_settings(config_file=cfg)
    assert s.strategy is Strategy.LEAST_INFLIGHT
    assert s.port == 9000  # untouched by env, still from YAML


def test_precedence_overrides_over_env_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, "upstreams: ['http://y:1']\nstrategy: round_robin\n")
    monkeypatch.setenv("GATEWAY_STRATEGY", "least_inflight")
    monkeypatch.setenv("GATEWAY_UPSTREAMS", "http://env:2")
    s = load_settings({"strategy": "priority", "upstreams": ["http://cli:3"]}, config_file=cfg)
    assert s.strategy is Strategy.PRIORITY
    assert [u.url for u in s.upstreams] == ["http://cli:3"]


def test_precedence_env_upstreams_replace_yaml_upstreams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path, "upstreams: ['http://y:1', 'http://y:2']\n")
    monkeypatch.setenv("GATEWAY_UPSTREAMS", "http://env:2")
    assert [u.url for u in load_settings(config_file=cfg).upstreams] == ["http://env:2"]


def test_precedence_nested_env_merges_with_yaml_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(
        tmp_path,
        "upstreams: ['http://y:1']\nretry:\n  max_attempts: 5\n  budget_ratio: 0.1\n",
    )
    monkeypatch.setenv("GATEWAY_RETRY__BUDGET_RATIO", "0.5")
    s = load_settings(config_file=cfg)
    assert s.retry.max_attempts == 5  # from YAML
    assert s.retry.budget_ratio == 0.5  # env wins for this field only


def test_precedence_nested_override_merges_with_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_RETRY__MAX_ATTEMPTS", "7")
    monkeypatch.setenv("GATEWAY_RETRY__BUDGET_RATIO", "0.5")
    s = load_settings({**ONE, "retry": {"max_attempts": 2}})
    assert s.retry.max_attempts == 2
    assert s.retry.budget_ratio == 0.5


def test_env_nested_delimiter_sets_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_UPSTREAMS", "http://a:1")
    monkeypatch.setenv("GATEWAY_RETRY__MAX_ATTEMPTS", "2")
    monkeypatch.setenv("GATEWAY_OUTLIER__BASE_EJECTION_S", "10")
    monkeypatch.setenv("GATEWAY_TIMEOUTS__DEADLINE_S", "45.5")
    monkeypatch.setenv("GATEWAY_RETRY__ON_STATUSES", "[502, 503]")
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "hunter2")
    s = load_settings()
    assert s.retry.max_attempts == 2
    assert s.outlier.base_ejection_s == 10.0
    assert s.timeouts.deadline_s == 45.5
    assert s.retry.on_statuses == frozenset({502, 503})
    assert s.admin_token is not None
    assert s.admin_token.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s)


def test_gateway_settings_kwargs_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_STRATEGY", "round_robin")
    monkeypatch.setenv("GATEWAY_PORT", "9999")
    s = GatewaySettings(upstreams=[UpstreamSettings(url="http://a:1")], strategy=Strategy.PRIORITY)
    assert s.strategy is Strategy.PRIORITY
    assert s.port == 9999


def test_empty_yaml_file_is_allowed(tmp_path: Path) -> None:
    cfg = write(tmp_path, "# nothing here\n")
    assert read_yaml_config(cfg) == {}
    assert load_settings(ONE, config_file=cfg).port == 8080


# --- upstream parsing ----------------------------------------------------------------------


def test_env_upstreams_comma_list_with_optional_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_UPSTREAMS", "primary=http://10.0.0.1:8000, https://api.example/v1/ ,")
    s = load_settings()
    assert [(u.name, u.url) for u in s.upstreams] == [
        ("primary", "http://10.0.0.1:8000"),
        ("api.example:443", "https://api.example/v1"),
    ]


def test_env_upstreams_json_list_of_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "GATEWAY_UPSTREAMS",
        '[{"name": "gpu-a", "url": "http://a:8000", "weight": 2, "priority": 1,'
        ' "max_inflight": 8, "health_path": null}, "b=http://b:9000"]',
    )
    s = load_settings()
    a, b = s.upstreams
    assert (a.name, a.url, a.weight, a.priority, a.max_inflight, a.health_path) == (
        "gpu-a",
        "http://a:8000",
        2.0,
        1,
        8,
        None,
    )
    assert (b.name, b.url, b.health_path) == ("b", "http://b:9000", "/health")


def test_env_upstreams_bad_json_names_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_UPSTREAMS", '[{"url": ')
    message = config_error()
    assert "upstreams" in message
    assert "not valid JSON" in message


def test_upstream_default_name_is_host_and_port() -> None:
    s = load_settings({"upstreams": ["http://gpu-1", "https://gpu-2", "http://gpu-3:81/"]})
    assert [u.name for u in s.upstreams] == ["gpu-1:80", "gpu-2:443", "gpu-3:81"]
    assert [u.url for u in s.upstreams] == ["http://gpu-1", "https://gpu-2", "http://gpu-3:81"]


def test_upstream_url_trailing_slash_stripped_but_path_kept() -> None:
    (u,) = load_settings({"upstreams": ["http://a:1/openai/v1/"]}).upstreams
    assert u.url == "http://a:1/openai/v1"


def test_parse_upstream_spec_named_and_bare() -> None:
    assert parse_upstream_spec(" a.b-c_1=http://x:1 ") == {"name": "a.b-c_1", "url": "http://x:1"}
    assert parse_upstream_spec("http://x:1") == {"url": "http://x:1"}
    # an '=' that is not NAME=URL stays part of the URL (and is rejected later as a query)
    assert parse_upstream_spec("http://x:1/?a=b") == {"url": "http://x:1/?a=b"}
    assert parse_upstream_spec("k=v") == {"url": "k=v"}


def test_upstream_settings_accept_dict_from_yaml(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """
upstreams:
  - name: gpu-a
    url: http://a:8000
    weight: 3
    headers: {X-Team: ml}
  - b=http://b:8000
""",
    )
    a, b = load_settings(config_file=cfg).upstreams
    assert (a.name, a.weight, a.headers) == ("gpu-a", 3.0, {"X-Team": "ml"})
    assert b.name == "b"


# --- ${ENV} expansion ----------------------------------------------------------------------


def test_env_refs_expanded_in_upstream_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_TOKEN", "s3cret")
    monkeypatch.setenv("GW_TEST_TEAM", "ml")
    cfg = write(
        tmp_path,
        "upstreams:\n  - url: http://a:1\n    headers:\n"
        "      Authorization: Bearer ${GW_TEST_TOKEN}\n"
        "      X-Team: ${GW_TEST_TEAM}-${GW_TEST_TEAM}\n"
        "      X-Plain: $GW_TEST_TOKEN\n",
    )
    (u,) = load_settings(config_file=cfg).upstreams
    assert u.headers == {
        "Authorization": "Bearer s3cret",
        "X-Team": "ml-ml",
        "X-Plain": "$GW_TEST_TOKEN",  # only ${VAR} is a reference
    }


def test_env_refs_expanded_in_json_env_upstreams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_TOKEN", "tok")
    monkeypatch.setenv(
        "GATEWAY_UPSTREAMS",
        '[{"url": "http://a:1", "headers": {"Authorization": "Bearer ${GW_TEST_TOKEN}"}}]',
    )
    assert load_settings().upstreams[0].headers == {"Authorization": "Bearer tok"}


def test_env_refs_unset_variable_is_config_error() -> None:
    message = config_error(
        {"upstreams": [{"url": "http://a:1", "headers": {"Authorization": "${GW_TEST_TOKEN}"}}]}
    )
    assert "upstreams.0.headers" in message
    assert "GW_TEST_TOKEN is not set" in message


def test_expand_env_refs_uses_given_mapping() -> None:
    assert expand_env_refs("a ${X} b ${Y_2}", {"X": "1", "Y_2": ""}) == "a 1 b "
    assert expand_env_refs("no refs ${", {}) == "no refs ${"
    with pytest.raises(ValueError, match="MISSING"):
        expand_env_refs("${MISSING}", {})


# --- errors name the field -----------------------------------------------------------------


def test_error_unknown_strategy() -> None:
    message = config_error({**ONE, "strategy": "fastest"})
    assert message.startswith("invalid configuration: strategy:")
    assert "round_robin" in message
    assert "GATEWAY_STRATEGY" in message


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://files.example/x", "is not an http(s) URL"),
        ("http://", "is not an http(s) URL"),
        ("http:///only/path", "is not an http(s) URL"),
        ("10.0.0.1:8000", "is not an http(s) URL"),
        ("http://a:1/v1?key=1", "has a query or fragment"),
        ("http://a:1/#frag", "has a query or fragment"),
    ],
)
def test_error_bad_url_names_upstream_field(url: str, why: str) -> None:
    message = config_error({"upstreams": ["http://ok:1", url]})
    assert "upstreams.1.url" in message
    assert why in message


def test_error_bad_url_from_env_names_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_UPSTREAMS", "ftp://x")
    assert "upstreams.0.url" in config_error()


def test_error_duplicate_upstream_names() -> None:
    message = config_error({"upstreams": ["a=http://x:1", "a=http://y:1"]})
    assert "duplicate upstream name 'a'" in message


def test_error_duplicate_default_names_suggests_naming() -> None:
    message = config_error({"upstreams": ["http://x:1/a", "http://x:1/b"]})
    assert "duplicate upstream name 'x:1'" in message
    assert "NAME=URL" in message


def test_error_no_upstreams() -> None:
    message = config_error()
    assert "no upstreams configured" in message
    assert "GATEWAY_UPSTREAMS" in message


def test_error_no_upstreams_from_empty_env_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_UPSTREAMS", " , ")
    assert "no upstreams configured" in config_error()


@pytest.mark.parametrize("field", ["connect_s", "attempt_s", "idle_s", "deadline_s"])
def test_error_negative_timeout_names_field(field: str) -> None:
    message = config_error({**ONE, "timeouts": {field: -1}})
    assert f"timeouts.{field}:" in message
    assert f"GATEWAY_TIMEOUTS__{field.upper()}" in message


def test_error_negative_timeout_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TIMEOUTS__CONNECT_S", "-2")
    assert "timeouts.connect_s:" in config_error(ONE)


def test_error_retry_status_outside_4xx_5xx() -> None:
    message = config_error({**ONE, "retry": {"on_statuses": [200, 503, 302, 600]}})
    assert "retry.on_statuses" in message
    assert "[200, 302, 600]" in message
    assert "GATEWAY_RETRY__ON_STATUSES" in message


def test_error_max_ejection_below_base() -> None:
    message = config_error({**ONE, "outlier": {"base_ejection_s": 60, "max_ejection_s": 30}})
    assert "outlier.max_ejection_s must be >= outlier.base_ejection_s" in message


def test_max_ejection_equal_to_base_is_fine() -> None:
    s = load_settings({**ONE, "outlier": {"base_ejection_s": 60, "max_ejection_s": 60}})
    assert s.outlier.max_ejection_s == 60


@pytest.mark.parametrize(
    ("upstream", "field"),
    [
        ({"url": "http://a:1", "weight": 0}, "upstreams.0.weight"),
        ({"url": "http://a:1", "priority": -1}, "upstreams.0.priority"),
        ({"url": "http://a:1", "max_inflight": 0}, "upstreams.0.max_inflight"),
        ({"url": "http://a:1", "health_path": "health"}, "upstreams.0.health_path"),
        ({"url": "http://a:1", "name": "bad name!"}, "upstreams.0"),
        ({"url": "http://a:1", "colour": "red"}, "upstreams.0.colour"),
    ],
)
def test_error_bad_upstream_field(upstream: dict[str, Any], field: str) -> None:
    assert f"{field}" in config_error({"upstreams": [upstream]})


def test_error_unknown_setting() -> None:
    assert "bogus" in config_error({**ONE, "bogus": 1})


def test_error_bad_log_level() -> None:
    assert "log_level" in config_error({**ONE, "log_level": "verbose"})
    assert load_settings({**ONE, "log_level": "DEBUG"}).log_level == "debug"


def test_error_several_fields_reported_together() -> None:
    message = config_error({**ONE, "strategy": "x", "port": 70000})
    assert "strategy:" in message and "port:" in message


# --- YAML file errors ----------------------------------------------------------------------


def test_error_bad_yaml(tmp_path: Path) -> None:
    cfg = write(tmp_path, "upstreams: [\n  - x\n")
    message = config_error(config_file=cfg)
    assert str(cfg) in message
    assert "not valid YAML" in message


def test_error_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    message = config_error(config_file=missing)
    assert str(missing) in message
    assert "No such file" in message


def test_error_yaml_top_level_not_mapping(tmp_path: Path) -> None:
    cfg = write(tmp_path, "- http://a:1\n- http://b:1\n")
    message = config_error(config_file=cfg)
    assert str(cfg) in message
    assert "must be a mapping" in message


def test_error_yaml_bad_value_names_field(tmp_path: Path) -> None:
    cfg = write(tmp_path, "upstreams: ['http://a:1']\nretry:\n  max_attempts: 0\n")
    assert "retry.max_attempts" in config_error(config_file=cfg)


def test_upstream_settings_model_validates_directly() -> None:
    u = UpstreamSettings(url="http://h:5/")
    assert (u.name, u.url) == ("h:5", "http://h:5")


def test_expected_statuses_accept_ints_ranges_and_an_env_list(monkeypatch: pytest.MonkeyPatch) -> None:
    assert HealthSettings().expected_statuses == frozenset(range(200, 300))
    h = HealthSettings(expected_statuses=[200, "204-206", " 401 "])
    assert h.expected_statuses == {200, 204, 205, 206, 401}
    monkeypatch.setenv("GATEWAY_HEALTH__EXPECTED_STATUSES", "200-299,401")
    monkeypatch.setenv("GATEWAY_UPSTREAMS", "http://127.0.0.1:1")
    s = load_settings()
    assert s.health.expected_statuses == frozenset(range(200, 300)) | {401}


@pytest.mark.parametrize("bad", ["abc", "299-200", "99", "200-700", "", "2xx"])
def test_expected_statuses_reject_bad_items_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("GATEWAY_HEALTH__EXPECTED_STATUSES", bad)
    monkeypatch.setenv("GATEWAY_UPSTREAMS", "http://127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"health\.expected_statuses: .*GATEWAY_HEALTH__EXPECTED_STATUSES"):
        load_settings()
