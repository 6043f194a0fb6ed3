"""Configuration: where the file comes from, environment overrides, validation."""

from __future__ import annotations

import pytest
from sqlalchemy import make_url

from molteniron import config as config_module
from molteniron.config import Config, load_config
from molteniron.errors import ConfigError


@pytest.fixture(autouse=True)
def no_system_config(tmp_path, monkeypatch):
    """Keep /etc/molteniron/conf.yaml (if this machine has one) out of every test."""
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", str(tmp_path / "etc-missing" / "conf.yaml"))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def three_files(tmp_path):
    explicit = write(tmp_path / "explicit.yaml", "prefetch: 1\n")
    conf_dir = tmp_path / "confdir"
    write(conf_dir / "conf.yaml", "prefetch: 2\n")
    from_env = write(tmp_path / "env.yaml", "prefetch: 3\n")
    return str(explicit), str(conf_dir), str(from_env)


def test_defaults_without_any_file():
    assert load_config(env={}) == Config()
    assert Config().db_url.startswith("mysql+pymysql://")
    assert Config().log_level == "INFO"


def test_explicit_path_wins_over_everything(three_files):
    explicit, conf_dir, from_env = three_files
    cfg = load_config(explicit, conf_dir, env={"MOLTENIRON_CONFIG": from_env})
    assert cfg.prefetch == 1


def test_conf_dir_wins_over_env_variable(three_files):
    _, conf_dir, from_env = three_files
    assert load_config(None, conf_dir, env={"MOLTENIRON_CONFIG": from_env}).prefetch == 2
    assert load_config(conf_dir=conf_dir, env={}).prefetch == 2


def test_env_variable_names_the_file(three_files):
    *_, from_env = three_files
    assert load_config(env={"MOLTENIRON_CONFIG": from_env}).prefetch == 3


def test_system_config_used_when_nothing_else(tmp_path, monkeypatch, three_files):
    system = write(tmp_path / "etc" / "conf.yaml", "prefetch: 4\n")
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", str(system))
    assert load_config(env={}).prefetch == 4
    *_, from_env = three_files
    assert load_config(env={"MOLTENIRON_CONFIG": from_env}).prefetch == 3


def test_file_values_are_read_and_typed(tmp_path):
    path = write(tmp_path / "c.yaml", (
        "db_url: mysql+pymysql://mi@db.example:3306/pool\n"
        "amqp_url: amqp://mi@mq.example:5672/%2F\n"
        "allocate_wait: 60\n"
        "request_timeout: '12.5'\n"
        "prefetch: '64'\n"
        "tick_interval: 0.25\n"
        "log_level: debug\n"))
    cfg = load_config(str(path), env={})
    assert cfg == Config(db_url="mysql+pymysql://mi@db.example:3306/pool",
                         amqp_url="amqp://mi@mq.example:5672/%2F", allocate_wait=60.0,
                         request_timeout=12.5, prefetch=64, tick_interval=0.25,
                         log_level="DEBUG")
    assert isinstance(cfg.allocate_wait, float) and isinstance(cfg.prefetch, int)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(str(write(tmp_path / "c.yaml", "")), env={}) == Config()
    assert load_config(str(write(tmp_path / "d.yaml", "# only a comment\n")), env={}) == Config()


def test_env_overrides_urls(tmp_path):
    path = write(tmp_path / "c.yaml", "db_url: mysql+pymysql://file@h/db\n"
                                      "amqp_url: amqp://file@h/\n")
    env = {"MOLTENIRON_DB_URL": "mysql+pymysql://env@other:3307/db2",
           "MOLTENIRON_AMQP_URL": "amqp://env@mq:5673/vh"}
    cfg = load_config(str(path), env=env)
    assert cfg.db_url == "mysql+pymysql://env@other:3307/db2"
    assert cfg.amqp_url == "amqp://env@mq:5673/vh"
    # Without a file too, and an empty variable does not override.
    assert load_config(env={"MOLTENIRON_DB_URL": "sqlite:///x"}).db_url == "sqlite:///x"
    assert load_config(str(path), env={"MOLTENIRON_DB_URL": ""}).db_url == \
        "mysql+pymysql://file@h/db"


def test_db_password_from_env_is_inserted_into_the_url(tmp_path):
    path = write(tmp_path / "c.yaml", "db_url: mysql+pymysql://mi@db.example:3306/pool\n")
    cfg = load_config(str(path), env={"MOLTENIRON_DB_PASSWORD": "pw"})
    assert cfg.db_url == "mysql+pymysql://mi:pw@db.example:3306/pool"


def test_db_password_replaces_one_in_the_file_and_is_quoted(tmp_path):
    path = write(tmp_path / "c.yaml", "db_url: mysql+pymysql://mi:old@db.example:3306/pool\n")
    secret = "p@ss:w/rd%#?"
    cfg = load_config(str(path), env={"MOLTENIRON_DB_PASSWORD": secret})
    url = make_url(cfg.db_url)
    assert url.password == secret
    assert (url.username, url.host, url.port, url.database) == ("mi", "db.example", 3306, "pool")
    assert "old" not in cfg.db_url


def test_db_password_applies_to_the_env_url_and_amqp_password_to_amqp(tmp_path):
    env = {"MOLTENIRON_DB_URL": "mysql+pymysql://envuser@envhost/envdb",
           "MOLTENIRON_DB_PASSWORD": "dbpw", "MOLTENIRON_AMQP_PASSWORD": "mqpw"}
    cfg = load_config(env=env)
    assert cfg.db_url == "mysql+pymysql://envuser:dbpw@envhost/envdb"
    assert cfg.amqp_url == "amqp://guest:mqpw@127.0.0.1:5672/%2F"


def test_a_password_override_keeps_a_percent_encoded_user_name():
    cfg = load_config(env={"MOLTENIRON_AMQP_URL": "amqp://ci%40team@mq:5672/molteniron",
                           "MOLTENIRON_AMQP_PASSWORD": "pw"})
    assert cfg.amqp_url == "amqp://ci%40team:pw@mq:5672/molteniron"


def test_db_password_keeps_an_ipv6_host():
    cfg = load_config(env={"MOLTENIRON_DB_URL": "mysql+pymysql://mi@[::1]:3306/pool",
                           "MOLTENIRON_DB_PASSWORD": "pw"})
    assert cfg.db_url == "mysql+pymysql://mi:pw@[::1]:3306/pool"


def test_unknown_key_names_the_key_and_every_known_one(tmp_path):
    path = write(tmp_path / "c.yaml", "prefetch: 4\ndb_uri: mysql://x\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert "db_uri" in info.value.message
    assert str(path) in info.value.message
    assert f"(known: {', '.join(sorted(Config._fields))})" in info.value.message
    assert "db_url, history_retention" in info.value.message  # the fields, not NamedTuple's
    assert info.value.status == 400


def test_a_malformed_url_with_a_password_override_is_a_config_error_not_a_traceback():
    with pytest.raises(ConfigError, match="malformed") as info:
        load_config(env={"MOLTENIRON_AMQP_URL": "amqp://[bad",
                         "MOLTENIRON_AMQP_PASSWORD": "s3cret"})
    assert "s3cret" not in info.value.message


def test_lease_keys_default_and_the_default_lease_may_not_pass_the_cap(tmp_path):
    defaults = load_config(env={})
    assert (defaults.lease_seconds, defaults.max_lease_seconds) == (21600, 604800)
    assert defaults.history_retention == 90 * 86400
    path = write(tmp_path / "c.yaml", "lease_seconds: 7200\nmax_lease_seconds: 3600\n")
    with pytest.raises(ConfigError, match="max_lease_seconds"):
        load_config(str(path), env={})


@pytest.mark.parametrize("key, value", [
    ("lease_seconds", "0"), ("max_lease_seconds", "1.5"), ("history_retention", "-1"),
    ("prefetch", "lots"), ("prefetch", "true"), ("prefetch", 2.5), ("prefetch", "[1, 2]"),
    ("allocate_wait", "soon"), ("request_timeout", "{a: 1}"), ("tick_interval", "null"),
    ("db_url", "5"), ("db_url", "''"), ("db_url", "', ,'"), ("amqp_url", "[]"),
        ("amqp_url", "[5]"), ("prefetch", "0"),
    ("allocate_wait", "-1"), ("reply_retention", "0.0"),
])
def test_wrong_type_or_value_names_the_key(tmp_path, key, value):
    path = write(tmp_path / "c.yaml", f"{key}: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert key in info.value.message


def test_nan_is_not_a_positive_number(tmp_path):
    path = write(tmp_path / "c.yaml", "tick_interval: .nan\n")
    with pytest.raises(ConfigError, match="tick_interval"):
        load_config(str(path), env={})


@pytest.mark.parametrize("text", ["prefetch: [1\n", "a: b: c\n", "key: 'unterminated\n",
                                  "\tprefetch: 1\n"])
def test_invalid_yaml_is_a_config_error(tmp_path, text):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert "not valid YAML" in info.value.message
    assert str(path) in info.value.message


@pytest.mark.parametrize("text", ["- prefetch\n- 1\n", "just a string\n", "42\n"])
def test_non_mapping_is_a_config_error(tmp_path, text):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(path), env={})


def test_missing_named_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing), env={})
    assert str(missing) in info.value.message
    with pytest.raises(ConfigError):
        load_config(env={"MOLTENIRON_CONFIG": str(missing)})
    with pytest.raises(ConfigError):
        load_config(conf_dir=str(tmp_path / "no-dir"), env={})


@pytest.mark.parametrize("level, expected", [("debug", "DEBUG"), ("Warning", "WARNING"),
                                             ("ERROR", "ERROR"), ("info", "INFO")])
def test_log_level_accepted_in_any_case(tmp_path, level, expected):
    path = write(tmp_path / "c.yaml", f"log_level: {level}\n")
    assert load_config(str(path), env={}).log_level == expected


@pytest.mark.parametrize("level", ["VERBOSE", "10", "''", "true"])
def test_log_level_validated(tmp_path, level):
    path = write(tmp_path / "c.yaml", f"log_level: {level}\n")
    with pytest.raises(ConfigError, match="log_level"):
        load_config(str(path), env={})


def test_several_servers_as_a_yaml_list_or_comma_separated_are_kept_in_order(tmp_path):
    path = write(tmp_path / "c.yaml", "amqp_url:\n  - amqp://w@mq1/vh\n  - amqp://w@mq2/vh\n"
                                      "db_url: mysql+pymysql://w@db1/p, mysql+pymysql://w@db2/p\n")
    cfg = load_config(str(path), env={})
    assert config_module.url_list(cfg.amqp_url) == ["amqp://w@mq1/vh", "amqp://w@mq2/vh"]
    assert config_module.url_list(cfg.db_url) == ["mysql+pymysql://w@db1/p",
                                                  "mysql+pymysql://w@db2/p"]
    env = {"MOLTENIRON_AMQP_URL": "amqp://e@mq3/vh,amqp://e@mq4/vh"}
    assert config_module.url_list(load_config(str(path), env=env).amqp_url) == [
        "amqp://e@mq3/vh", "amqp://e@mq4/vh"]


def test_a_password_override_applies_to_every_server(tmp_path):
    path = write(tmp_path / "c.yaml", "db_url: [mysql+pymysql://w@db1/p, mysql+pymysql://w@db2/p]\n")
    cfg = load_config(str(path), env={"MOLTENIRON_DB_PASSWORD": "a,b"})
    urls = [make_url(url) for url in config_module.url_list(cfg.db_url)]
    assert [(u.host, u.password) for u in urls] == [("db1", "a,b"), ("db2", "a,b")]


def test_a_comma_inside_a_listed_url_is_refused_with_the_way_out(tmp_path):
    path = write(tmp_path / "c.yaml", "amqp_url: ['amqp://w:p,q@mq1/vh']\n")
    with pytest.raises(ConfigError, match="%2C"):
        load_config(str(path), env={})


def test_a_file_that_cannot_be_read_is_a_config_error_naming_it(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"cannot read configuration {missing}"):
        load_config(str(missing), env={})
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("log_level: INFO # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: it is not UTF-8 text"):
        load_config(str(latin1), env={})


def test_a_system_config_that_cannot_be_checked_is_an_error_not_the_defaults(monkeypatch):
    """/etc/molteniron is 750 root:molteniron (deploy/install.sh): a user outside the
    group must be told, not sent to amqp://guest@127.0.0.1. (As root, EACCES is faked.)"""
    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(config_module.os, "stat", refused)
    with pytest.raises(ConfigError, match="cannot read configuration .*: Permission denied"):
        load_config(env={})


@pytest.mark.parametrize("given, expected", [("json", "json"), ("JSON", "json"), ("text", "text")])
def test_log_format_is_text_or_json_in_any_case(tmp_path, given, expected):
    assert Config().log_format == "text"
    path = write(tmp_path / "c.yaml", f"log_format: {given}\n")
    assert load_config(str(path), env={}).log_format == expected


@pytest.mark.parametrize("given", ["logfmt", "''", "1"])
def test_log_format_validated(tmp_path, given):
    path = write(tmp_path / "c.yaml", f"log_format: {given}\n")
    with pytest.raises(ConfigError, match="log_format"):
        load_config(str(path), env={})


# --- the CLI's lookup: client.yaml (deploy/install.sh writes it for CI agents) -----------


@pytest.fixture
def kit_etc(tmp_path, monkeypatch):
    """An /etc/molteniron as install.sh leaves it: client.yaml and conf.yaml."""
    etc = tmp_path / "etc"
    client = write(etc / "client.yaml", "amqp_url: amqp://molteniron-ci@mq/molteniron\n"
                                        "request_timeout: 7\n")
    system = write(etc / "conf.yaml", "amqp_url: amqp://molteniron-worker@mq/molteniron\n"
                                      "db_url: mysql+pymysql://molteniron@db/molteniron\n")
    monkeypatch.setattr(config_module, "CLIENT_CONFIG", str(client))
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", str(system))
    return etc


def refuse_opening(monkeypatch, refused: str) -> None:
    """What a user who may not read `refused` meets (faked: the tests run as root)."""
    def guarded(real_open):
        def opener(path, *args, **kwargs):
            if str(path) == refused:
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *args, **kwargs)
        return opener
    monkeypatch.setattr(config_module.os, "open", guarded(config_module.os.open))
    monkeypatch.setattr(config_module, "open", guarded(open), raising=False)


def test_the_cli_reads_client_yaml_first_and_the_services_never_do(kit_etc):
    cli = load_config(env={}, client=True)
    assert (cli.amqp_url, cli.request_timeout) == ("amqp://molteniron-ci@mq/molteniron", 7.0)
    service = load_config(env={})
    assert service.amqp_url == "amqp://molteniron-worker@mq/molteniron"
    # Told where to look, the CLI reads what it is told.
    assert load_config(env={"MOLTENIRON_CONFIG": str(kit_etc / "conf.yaml")},
                       client=True).amqp_url == service.amqp_url


def test_without_client_yaml_the_cli_reads_conf_yaml_as_before(kit_etc):
    (kit_etc / "client.yaml").unlink()
    assert load_config(env={}, client=True).amqp_url == "amqp://molteniron-worker@mq/molteniron"


def test_an_unreadable_conf_yaml_is_skipped_when_the_environment_names_the_broker(
        kit_etc, monkeypatch, caplog):
    """An agent of a kit without client.yaml: conf.yaml is not its to read, and Jenkins
    gives it the broker; it runs, saying what it skipped."""
    (kit_etc / "client.yaml").unlink()
    refuse_opening(monkeypatch, str(kit_etc / "conf.yaml"))
    env = {"MOLTENIRON_AMQP_URL": "amqp://molteniron-ci@mq/molteniron",
           "MOLTENIRON_AMQP_PASSWORD": "from-jenkins"}
    config = load_config(env=env, client=True)
    assert config.amqp_url == "amqp://molteniron-ci:from-jenkins@mq/molteniron"
    assert config.request_timeout == Config().request_timeout
    assert f"not reading {kit_etc / 'conf.yaml'} (Permission denied)" in caplog.text
    # Without the broker in the environment it is an error saying how to give it.
    with pytest.raises(ConfigError, match=r"cannot read configuration .*conf\.yaml: Permission "
                                          r"denied \(a CI agent: .*MOLTENIRON_AMQP_URL"):
        load_config(env={"MOLTENIRON_AMQP_PASSWORD": "from-jenkins"}, client=True)
    # The services never skip their file.
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(env=env)
