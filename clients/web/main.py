"""molteniron-web: serve the pool's pages and JSON API (waitress, threads).

    molteniron-web [--config FILE | -c DIR] [--address HOST:PORT] [--password-file FILE]
    molteniron-web --hash-password USER      # a line for the password file

It logs in to RabbitMQ with amqp_url of the configuration (MOLTENIRON_AMQP_URL and
MOLTENIRON_AMQP_PASSWORD override it, as everywhere): give it a broker user of its
own (the kit's molteniron-web, with a CI user's permissions). It binds to
`web_address` (default 127.0.0.1:8080, loopback only) unless --address says
otherwise. Exit 2: bad configuration or options.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import re
import signal
import sys
from urllib.parse import unquote, urlsplit

from molteniron import __version__, errors, logs
from molteniron.config import load_config, url_list

DEFAULT_ADDRESS = "127.0.0.1:8080"
THREADS = 8

log = logging.getLogger("molteniron.clients.web")


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT or [IPv6]:PORT; ConfigError if it is neither."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]*):(\d{1,5})", text or "")
    if match is None:
        raise errors.ConfigError(f"web address must be HOST:PORT (or [IPv6]:PORT), got {text!r}")
    host = match.group(1) or match.group(3) or "127.0.0.1"
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise errors.ConfigError(f"web address: port {port} is out of range")
    return host, port


def scrubber(amqp_url: str):
    """A function masking, in any text, the broker passwords of amqp_url and any
    user:password@ of a URL: nothing this process shows or logs holds a credential."""
    secrets = set()
    for url in url_list(amqp_url):
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            secrets.update({password, unquote(password)})
    userinfo = re.compile(r"(//[^/@\s:]*):[^/@\s]*@")

    def scrub(text: str) -> str:
        text = userinfo.sub(r"\1:****@", str(text))
        for secret in secrets:
            text = text.replace(secret, "****")
        return text
    return scrub


def broker_of(amqp_url: str) -> str:
    """user@host:port/vhost of the first broker, for the start line."""
    parts = urlsplit(url_list(amqp_url)[0])
    return f"{parts.username or '?'}@{parts.hostname}:{parts.port or ''}{parts.path}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molteniron-web", description=(
        "Serve MoltenIron's pool as web pages and a JSON API (read-only)."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", help="configuration file")
    parser.add_argument("-c", "--conf-dir", help="read DIR/conf.yaml")
    parser.add_argument("--address", help="HOST:PORT to serve on (default: web_address of "
                        f"the configuration, else {DEFAULT_ADDRESS}); port 0: any free port")
    parser.add_argument("--password-file", help="basic auth: user:hash lines (make them "
                        "with --hash-password); unset: no login asked")
    parser.add_argument("--refresh", type=float, default=5.0,
                        help="seconds between a page's live updates (0.5-5, default 5)")
    parser.add_argument("--sample-every", type=float, default=None,
                        help="seconds between the 24 h charts' samples (default 10)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"HTTP threads (default {THREADS})")
    parser.add_argument("--hash-password", metavar="USER",
                        help="print a password file line for USER (password from the "
                             "terminal, or the first line of stdin) and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hash_password:
        return _hash_password(args.hash_password)
    try:
        config = load_config(args.config, args.conf_dir)
        address = args.address or getattr(config, "web_address", None) or DEFAULT_ADDRESS
        host, port = parse_address(address)
        if not 0.5 <= args.refresh <= 5:
            raise errors.ConfigError(f"--refresh must be between 0.5 and 5 s, got {args.refresh:g}")
        passwords = None
        if args.password_file:
            from molteniron.clients.web.auth import PasswordFile
            passwords = PasswordFile(args.password_file)
    except errors.ConfigError as exc:
        print(f"molteniron-web: {exc.message}", file=sys.stderr)
        return 2
    # pika says WARNING for every refused passive declare: the pages say it once, better.
    logs.setup(config, quiet={"pika": logging.ERROR})
    return serve(config, host, port, passwords, args.refresh, args.sample_every, args.threads)


def serve(config, host: str, port: int, passwords, refresh: float,
          sample_every: float | None, threads: int) -> int:
    from waitress import create_server

    from molteniron.clients.web.app import create_app
    from molteniron.clients.web.reader import PoolReader
    from molteniron.clients.web.series import SAMPLE_EVERY, Sampler, Series

    scrub = scrubber(config.amqp_url)
    reader = PoolReader(config.amqp_url, tls=config)
    series = Series()
    sampler = Sampler(reader, series, sample_every or SAMPLE_EVERY).start()
    app = create_app(reader, series, passwords, refresh, scrub)
    try:
        server = create_server(app, host=host, port=port, threads=threads, ident="",
                               clear_untrusted_proxy_headers=True)
    except OSError as exc:
        print(f"molteniron-web: cannot serve on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 2
    bound_port = server.effective_port
    shown = f"[{host}]" if ":" in host else host
    log.info("event=serving url=http://%s:%s/ broker=%s auth=%s", shown, bound_port,
             scrub(broker_of(config.amqp_url)), "basic" if passwords else "off")

    def stop(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.close()
        sampler.stop()
        reader.close()
        log.info("event=stopped")
    return 0


def _hash_password(user: str) -> int:
    from molteniron.clients.web.auth import hash_line
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {user}: ")
        if password != getpass.getpass("again: "):
            print("molteniron-web: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("molteniron-web: a password of at least 8 characters, please", file=sys.stderr)
        return 2
    try:
        print(hash_line(user, password))
    except errors.ConfigError as exc:
        print(f"molteniron-web: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
