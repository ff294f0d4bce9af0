"""AmqpSettings: parsing URLs and the environment, and keeping the password out of sight."""

from __future__ import annotations

import pytest

from conveyor.errors import ConfigError
from workers.amqp.settings import AmqpSettings

URL = "amqp://worker:s3cret@rabbit.internal:5673/conveyor"


def test_from_url_reads_host_port_and_query_parameters() -> None:
    settings = AmqpSettings.from_url(URL + "?heartbeat=7&confirm_timeout=2.5&name=w1")
    assert settings.address == "rabbit.internal:5673"
    assert settings.heartbeat_s == 7
    assert settings.confirm_timeout_s == 2.5
    assert settings.connection_name == "w1"
    assert "?" not in settings.url


def test_default_ports_follow_the_scheme() -> None:
    assert AmqpSettings.from_url("amqp://h/").port == 5672
    assert AmqpSettings.from_url("amqps://h/").port == 5671


def test_password_never_shows_in_repr_or_safe_url() -> None:
    settings = AmqpSettings.from_url(URL)
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in settings.safe_url
    assert settings.safe_url.startswith("amqp://worker:***@rabbit.internal:5673")


def test_the_environment_adds_optional_fields_to_the_url() -> None:
    settings = AmqpSettings.from_url_and_env(URL, {"CONVEYOR_AMQP_CONNECT_TIMEOUT": "3"})
    assert settings.connect_timeout_s == 3.0
    assert settings.host == "rabbit.internal"


def test_messages_are_persistent_unless_the_url_or_environment_says_otherwise() -> None:
    assert AmqpSettings.from_url(URL).persistent is True
    assert AmqpSettings.from_url("amqp://h/?persistent=0").persistent is False
    env = {"CONVEYOR_AMQP_PERSISTENT": "no"}
    assert AmqpSettings.from_url_and_env("amqp://h/", env).persistent is False
    with pytest.raises(ConfigError, match="persistent"):
        AmqpSettings.from_url("amqp://h/?persistent=maybe")


@pytest.mark.parametrize(
    ("url", "overrides", "fragment"),
    [
        ("http://h/", {}, "amqp://"),
        ("amqp:///vhost", {}, "no host"),
        ("amqp://h/?frobnicate=1", {}, "frobnicate"),
        ("amqp://h/", {"heartbeat_s": "soon"}, "heartbeat_s"),
        ("amqp://h/", {"confirm_timeout_s": 0}, "confirm_timeout_s"),
        ("amqp://h/", {"colour": "red"}, "colour"),
    ],
)
def test_bad_settings_raise_config_error_naming_the_problem(
    url: str, overrides: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        AmqpSettings.from_url(url, **overrides)
