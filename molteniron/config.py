"""Configuration: a YAML file, then environment overrides, validated once.

Where the file comes from, first match wins: the path given (`--config`),
`DIR/conf.yaml` for `--conf-dir DIR`, `$MOLTENIRON_CONFIG`,
`/etc/molteniron/conf.yaml` if it exists, else only the defaults.

The `molteniron` CLI (client=True) looks for `/etc/molteniron/client.yaml` before
conf.yaml: deploy/install.sh writes it for CI agents, readable by every user and
holding no secret, while conf.yaml stays the services'. A file the CLI found
without being told, but may not read (conf.yaml of an older kit, say), is skipped
with a warning when $MOLTENIRON_AMQP_URL names the broker; without it, that is
an error as for the services (a silent fall-back to amqp://guest@127.0.0.1
would be a surprise).
"""

import os
import shlex
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from molteniron import flat_yaml
from molteniron.errors import ConfigError

SYSTEM_CONFIG = "/etc/molteniron/conf.yaml"
CLIENT_CONFIG = "/etc/molteniron/client.yaml"  # the CLI's first, if it exists
ADMINS_OFF = "off"  # config admins: authorization switched off on purpose
# The priority column is a signed 32-bit INT; a cap above this could not be stored.
MAX_PRIORITY_LIMIT = 1_000_000


class Config(NamedTuple):
    """Every key, its type and its default. Values are checked by _validated: the
    plain int, float and str keys by their default's type, the others by checks of
    their own.

    A named tuple, not a dataclass: importing and applying dataclasses would cost
    every `molteniron` command about 10 ms of its start (typing is imported anyway).
    No `from __future__ import annotations` in this module: NamedTuple would compile
    each field's annotation string at import, another millisecond."""

    # db_url and amqp_url may name several servers (a YAML list, or comma-separated):
    # they are kept comma-joined and tried in order (url_list splits them).
    db_url: str = "mysql+pymysql://root@127.0.0.1:3306/molteniron"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    allocate_wait: float = 3600.0         # seconds an allocate waits for nodes by default
    request_timeout: float = 30.0         # seconds the CLI waits for a worker to answer
    reply_retention: float = 86400.0      # seconds stored replies are kept for redeliveries
    history_retention: float = 7776000.0  # seconds ended allocations are kept (90 days)
    lease_seconds: int = 21600            # an allocation's lease unless allocate/renew says --lease
    max_lease_seconds: int = 604800       # the longest lease anyone may ask for (7 days)
    prefetch: int = 128                   # requests the worker drains into one transaction
    tick_interval: float = 1.0            # seconds between a worker's timer ticks
    log_level: str = "INFO"
    # text: one `time level logger event=... key=...` line per event (no time under
    # journald, which adds its own); json: one JSON object per line (molteniron/logs.py).
    log_format: str = "text"
    # Broker user names allowed to manage the pool, or "off" (ADMINS_OFF) for no
    # authorization at all (everyone may do everything, as in the original). None
    # (unset): the worker refuses to start, so authorization is never off by accident.
    admins: tuple[str, ...] | str | None = None
    # A file of Fernet keys, one per line, newest first: IPMI passwords are stored
    # encrypted with the first; any of them decrypts (rotation). None: plain text.
    secret_key_file: str | None = None
    # Effective priority a waiting allocate gains per minute, so a low one is not starved.
    priority_aging: float = 1.0
    # The most nodes each broker user may hold at once, e.g. {ci-team-a: 10}; "*" for
    # everyone else. None: no quotas.
    quotas: dict[str, int] | None = None
    # host:port where the worker serves Prometheus metrics (workers/metrics.py), e.g.
    # 127.0.0.1:9464 or [::]:9464. None or empty: no metrics endpoint.
    metrics_address: str | None = None
    # host:port where molteniron-web serves the status page and its JSON API.
    web_address: str | None = "127.0.0.1:8080"
    # Run by molteniron-cleaner on every released node before it is ready again, with
    # the node's fields in MOLTENIRON_* environment variables (no shell). None: released
    # nodes go straight back to ready. Set in the worker's config, it makes them dirty.
    cleaning_command: str | None = None
    # Seconds a cleaning may take: the cleaner kills the command after this, and the
    # worker lets another cleaner claim a node whose cleaner has not reported by then.
    cleaning_timeout: float = 1800.0
    # Limits on what one broker user who is not an admin may ask for, so that nobody
    # crowds the pool out: the highest allocate priority, how many allocates may wait
    # at once, and the longest wait (seconds).
    max_priority: int = 100
    max_waiting_per_user: int = 20
    max_wait_seconds: float = 86400.0
    # TLS to the broker (amqps:// URLs): a CA bundle to check the broker's certificate
    # against (None: the system's CAs), and a client certificate and its key where the
    # broker asks for one.
    amqp_ca_file: str | None = None
    amqp_cert_file: str | None = None
    amqp_key_file: str | None = None


# Environment variable -> key; secrets can live here instead of in the file.
ENV_OVERRIDES = {
    "MOLTENIRON_DB_URL": "db_url",
    "MOLTENIRON_AMQP_URL": "amqp_url",
    "MOLTENIRON_ADMINS": "admins",  # comma-separated broker user names, or off
    "MOLTENIRON_AMQP_CA_FILE": "amqp_ca_file",
    "MOLTENIRON_AMQP_CERT_FILE": "amqp_cert_file",
    "MOLTENIRON_AMQP_KEY_FILE": "amqp_key_file",
}
ENV_PASSWORDS = {
    "MOLTENIRON_DB_PASSWORD": "db_url",
    "MOLTENIRON_AMQP_PASSWORD": "amqp_url",
}
_POSITIVE = {"allocate_wait", "request_timeout", "reply_retention", "history_retention",
             "priority_aging", "cleaning_timeout",
             "lease_seconds", "max_lease_seconds", "prefetch", "tick_interval",
             "max_waiting_per_user", "max_wait_seconds"}
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR"}
_LOG_FORMATS = {"text", "json"}


def config_path(path: str | None = None, conf_dir: str | None = None,
                env: Mapping[str, str] = os.environ, client: bool = False) -> str | None:
    """The file to read, by the precedence in this module's docstring (client: the CLI's)."""
    if path:
        return path
    if conf_dir:
        return os.path.join(conf_dir, "conf.yaml")
    if env.get("MOLTENIRON_CONFIG"):
        return env["MOLTENIRON_CONFIG"]
    for candidate in (CLIENT_CONFIG, SYSTEM_CONFIG) if client else (SYSTEM_CONFIG,):
        try:
            os.stat(candidate)
            if client:  # a found file the CLI may not read may be skipped: try it now
                os.close(os.open(candidate, os.O_RDONLY))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:  # there may be one: defaults instead would be a silent surprise
            if client and isinstance(exc, PermissionError) and env.get("MOLTENIRON_AMQP_URL"):
                _skipped(candidate, exc.strerror or str(exc))
                continue
            hint = (" (a CI agent: give the broker in $MOLTENIRON_AMQP_URL and "
                    "$MOLTENIRON_AMQP_PASSWORD, or --config FILE)") if client else ""
            raise ConfigError(
                f"cannot read configuration {candidate}: {exc.strerror}{hint}") from None
        return candidate
    return None


def _skipped(path: str, why: str) -> None:
    import logging  # only here: the CLI's start stays quick; unconfigured, it prints to stderr
    logging.getLogger(__name__).warning(
        "molteniron: not reading %s (%s): using $MOLTENIRON_AMQP_URL and the defaults "
        "(deploy/install.sh writes %s for CI agents)", path, why, CLIENT_CONFIG)


def load_config(path: str | None = None, conf_dir: str | None = None,
                env: Mapping[str, str] = os.environ, client: bool = False) -> Config:
    """Read, override from the environment and validate the configuration.

    client: the `molteniron` CLI's lookup (client.yaml first; see the module's docstring)."""
    source = config_path(path, conf_dir, env, client)
    values = _read_yaml(source) if source else {}
    for var, key in ENV_OVERRIDES.items():
        if env.get(var):
            values[key] = env[var]
    config = _validated(values, source or "defaults")
    for var, key in ENV_PASSWORDS.items():
        if env.get(var):
            urls = [with_password(url, env[var]) for url in url_list(getattr(config, key))]
            with_passwords: dict[str, Any] = {key: ",".join(urls)}
            config = config._replace(**with_passwords)
    return config


def url_list(value: str) -> list[str]:
    """The URLs of a db_url or amqp_url, in the order they are tried.

    A comma inside a URL (in a password, say) must be written %2C."""
    return [url.strip() for url in value.split(",") if url.strip()]


def with_password(url: str, password: str) -> str:
    """The URL with its password replaced (so the file need not hold it)."""
    try:
        parts = urlsplit(url)
        # username is still percent-encoded as written: decode before encoding again.
        user = quote(unquote(parts.username or ""), safe="")
    except ValueError as exc:  # the URL itself is malformed: say so without echoing it
        raise ConfigError(f"a URL given with a password override is malformed: {exc}") from None
    host = parts.netloc.rpartition("@")[2]  # as written: keeps [IPv6] brackets and port
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def _read_yaml(source: str) -> dict:
    try:
        with open(source, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"cannot read configuration {source}: {why}") from None
    flat = flat_yaml.parse(text)
    if flat is not None:
        return flat
    import yaml  # only for a file flat_yaml does not read: keeps `molteniron` quick to start
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration {source} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"configuration {source} must be a mapping of key: value")
    return dict(data)


def _validated(values: dict, source: str) -> Config:
    for key in values:
        if key not in Config._fields:
            raise ConfigError(f"{source}: unknown configuration key {key!r} "
                              f"(known: {', '.join(sorted(Config._fields))})")
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if key == "admins":
            clean[key] = _user_names(key, value, source)
        elif key == "quotas":
            clean[key] = _quotas(value, source)
        elif key in ("metrics_address", "web_address"):
            clean[key] = _address(key, value, source)
        elif key in ("secret_key_file", "amqp_ca_file", "amqp_cert_file", "amqp_key_file"):
            clean[key] = None if value is None else _coerce(key, value, "str", source)
        elif key == "cleaning_command":
            clean[key] = _command(value, source)
        elif key in ("db_url", "amqp_url"):
            clean[key] = _urls(key, value, source)
        else:
            clean[key] = _coerce(key, value, type(Config._field_defaults[key]).__name__, source)
    config = Config(**clean)
    if not 0 <= config.max_priority <= MAX_PRIORITY_LIMIT:
        raise ConfigError(f"{source}: max_priority must be between 0 and {MAX_PRIORITY_LIMIT}, "
                          f"got {config.max_priority}")
    if (config.amqp_cert_file is None) != (config.amqp_key_file is None):
        raise ConfigError(f"{source}: amqp_cert_file and amqp_key_file go together: "
                          "give both or neither")
    if config.lease_seconds > config.max_lease_seconds:
        raise ConfigError(f"{source}: lease_seconds ({config.lease_seconds}) must not be longer "
                          f"than max_lease_seconds ({config.max_lease_seconds})")
    return config


def _urls(key: str, value, source: str) -> str:
    """One URL, a YAML list of them, or a comma-separated string: kept comma-joined."""
    items = url_list(value) if isinstance(value, str) else value
    if (not isinstance(items, list) or not items
            or not all(isinstance(url, str) and url.strip() for url in items)):
        raise ConfigError(f"{source}: {key} must be a URL or a list of URLs "
                          f"(tried in order; write a comma inside a URL as %2C)")
    if any("," in url for url in items):
        raise ConfigError(f"{source}: a URL in {key} holds a comma: write it as %2C")
    return ",".join(url.strip() for url in items)


def _quotas(value, source: str) -> dict | None:
    """{broker user (or "*"): most nodes held at once}."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
            isinstance(user, str) and user and isinstance(n, int) and not isinstance(n, bool)
            and n >= 0 for user, n in value.items()):
        raise ConfigError(f"{source}: quotas must map broker user names (or \"*\") to a "
                          "whole number of nodes, e.g. {ci-team-a: 10, \"*\": 4}")
    return dict(value)


def _command(value, source: str) -> str | None:
    """A command line split like a shell would split it (but never run by one)."""
    if value is None:
        return None
    command = _coerce("cleaning_command", value, "str", source)
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"{source}: cleaning_command cannot be split into words: {exc}") from None
    if not words:
        raise ConfigError(f"{source}: cleaning_command must name a program")
    return command


def _address(key: str, value, source: str) -> str | None:
    """host:port (IPv6 hosts in brackets); None or empty: off."""
    if value is None or value == "":
        return None
    host, _, port = str(value).rpartition(":")
    if not isinstance(value, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{source}: {key} must be host:port, e.g. 127.0.0.1:9464, "
                          f"got {value!r}")
    return value


def _user_names(key: str, value, source: str) -> tuple[str, ...] | str | None:
    """A YAML list of broker user names, or a comma-separated string (for the environment);
    "off" (YAML's bare off reads as false) switches authorization off on purpose."""
    if value is None:
        return None
    if value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return ADMINS_OFF
    if isinstance(value, str):
        value = [name.strip() for name in value.split(",") if name.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{source}: {key} must be a list of broker user names")
    return tuple(value)


def _coerce(key: str, value, type_name: str, source: str):
    wanted = {"str": str, "int": int, "float": float}[type_name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{source}: {key} must be a {type_name}, got {type(value).__name__}")
    if wanted is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {key} must be a non-empty string")
        choices = {"log_level": (value.upper(), _LOG_LEVELS),
                   "log_format": (value.lower(), _LOG_FORMATS)}
        if key in choices:
            chosen, allowed = choices[key]
            if chosen not in allowed:
                raise ConfigError(f"{source}: {key} must be one of {', '.join(sorted(allowed))}")
            return chosen
        return value
    try:
        number = wanted(value)
    except ValueError:
        raise ConfigError(f"{source}: {key} must be a {type_name}, got {value!r}") from None
    if wanted is int and isinstance(value, float) and value != number:
        raise ConfigError(f"{source}: {key} must be a whole number, got {value!r}")
    if key in _POSITIVE and not number > 0:  # also refuses NaN
        raise ConfigError(f"{source}: {key} must be greater than 0, got {value!r}")
    return number
