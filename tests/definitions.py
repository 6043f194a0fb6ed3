"""deploy/rabbitmq-definitions.json for tests, and broker users made with the permissions
it gives its users (so the file is what is tested). The `broker_users` fixture is
registered by conftest."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import pika
import pytest

from tests import services
from tests.stack import ROOT, _rabbitmqctl

DEFINITIONS = json.loads((ROOT / "deploy" / "rabbitmq-definitions.json").read_text())


def permissions_of(role: str) -> tuple[str, str, str]:
    """(configure, write, read) that the definitions file gives the user `role`."""
    (entry,) = [p for p in DEFINITIONS["permissions"] if p["user"] == role]
    return entry["configure"], entry["write"], entry["read"]


@dataclass
class BrokerUser:
    name: str
    password: str
    url: str  # amqp_url with this user's credentials, in the test run's vhost

    @property
    def env(self) -> dict:
        return {"MOLTENIRON_AMQP_URL": self.url}

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url))


@pytest.fixture
def broker_users(stack):
    """make(role) -> a new broker user with role's permissions from the definitions file,
    in the test run's vhost; deleted afterwards."""
    vhost = unquote(urlsplit(stack.amqp_url).path.lstrip("/"))
    host = urlsplit(stack.amqp_url).netloc.rpartition("@")[2]
    made: list[str] = []

    def make(role: str, name: str | None = None) -> BrokerUser:
        name = name or f"mi-test-{role.removeprefix('molteniron-')}-{uuid.uuid4().hex[:8]}"
        password = uuid.uuid4().hex
        _rabbitmqctl("add_user", name, password)
        made.append(name)
        _rabbitmqctl("set_permissions", "-p", vhost, name, *permissions_of(role))
        url = f"amqp://{quote(name, safe='')}:{password}@{host}/{quote(vhost, safe='')}"
        return BrokerUser(name, password, url)

    yield make
    for name in made:
        try:
            services.current().rabbitmqctl("delete_user", name)
        except services.BrokerAdminError:
            pass  # already gone: nothing to remove
