"""Config values that used to pass validation and fail (or do the wrong thing) later: server URLs
of another kind or with a Redis DB index that is not a number, tags that restores own or that a
retention rule cannot name, a metrics port out of range or already taken."""
from __future__ import annotations

import socket

import pytest

from backup.metrics import MetricsServer
from snapshots.errors import ConfigError
from snapshots.settings import check_server_url, check_tags, load_settings


@pytest.mark.parametrize("kind, url", [
    ("redis", "redis://127.0.0.1:6379/0"), ("redis", "redis://127.0.0.1:6379"), ("redis", "rediss://h:1/15"),
    ("redis", "unix:///run/redis.sock?db=2"), ("postgres", "postgresql://u@h:5432/db"),
    ("postgres", "postgres://u@h/db"), ("postgres", "host=/run/postgresql dbname=agent"),
    ("qdrant", "http://127.0.0.1:6333"), ("qdrant", "https://q.example.com"),
])
def test_server_urls_of_their_kind_pass(kind, url):
    assert check_server_url(kind, url) == url


@pytest.mark.parametrize("kind, url, why", [
    ("redis", "redis://127.0.0.1:6379/l", "DB index 'l' is not a number"),
    ("redis", "redis://:secret@127.0.0.1:6379/abc", "DB index 'abc'"),
    ("redis", "postgresql://u@h/db", "is not a redis URL"),
    ("postgres", "redis://h:6379/0", "is not a postgres URL"),
    ("qdrant", "redis://h:6379/0", "is not a qdrant URL"),
])
def test_server_urls_of_another_kind_or_a_bad_db_are_refused(kind, url, why):
    with pytest.raises(ValueError, match=why) as caught:
        check_server_url(kind, url)
    assert "secret" not in str(caught.value)  # the password is redacted in the message


def test_tags_a_user_may_set_and_those_refused():
    assert check_tags(["nightly", "v1.2", "team=agents"]) == ["nightly", "v1.2", "team=agents"]
    for bad in ["", "a,b", "two words", "pre-restore", "restore-of-20261127T000000Z-1a2b3c4d"]:
        with pytest.raises(ValueError):
            check_tags([bad])


def test_bad_values_in_the_config_file_name_their_key(tmp_path):
    config = tmp_path / "statevault.toml"
    cases = {
        '[sources.h]\nkind = "redis"\nurl = "redis://127.0.0.1:6379/l"\n': "sources.h",
        '[sources.h]\nkind = "redis"\ntags = ["pre-restore"]\n': "sources.h.redis.tags",
        '[daemon]\nmetrics_port = 70000\n': "daemon.metrics_port",
    }
    for body, key in cases.items():
        config.write_text('[repository]\nurl = "file://./repo"\n' + body)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_settings(config)


def test_a_metrics_port_already_taken_is_a_config_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}") as caught:
            MetricsServer(None, lambda: (True, {}), "127.0.0.1", port)  # type: ignore[arg-type]
        assert "metrics_port" in caught.value.hint


@pytest.mark.parametrize("expr, ok", [("0 * * * *", True), ("* * * * * */2", True), ("* * * * * * *", False),
                                      ("* * * *", False)])
def test_cron_schedules_take_five_fields_or_six_with_seconds(tmp_path, expr, ok):
    config = tmp_path / "statevault.toml"
    config.write_text(f'[repository]\nurl = "file://./repo"\n[sources.h]\nkind = "redis"\nschedule = "{expr}"\n')
    if ok:
        assert load_settings(config).sources["h"].schedule == expr
    else:
        with pytest.raises(ConfigError, match="sources.h"):
            load_settings(config)


def test_an_environment_variable_naming_no_setting_is_a_config_error(tmp_path, monkeypatch):
    config = tmp_path / "statevault.toml"
    config.write_text('[repository]\nurl = "file://./repo"\n')
    monkeypatch.setenv("STATEVAULT_REPOSITORY__URL", "file://./elsewhere")
    assert load_settings(config).repository.url == "file://./elsewhere"
    monkeypatch.setenv("STATEVAULT_REPOSITORI__URL", "file://./typo")
    with pytest.raises(ConfigError, match="STATEVAULT_REPOSITORI__URL: REPOSITORI is no setting"):
        load_settings(config)
