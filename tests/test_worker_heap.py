"""The pool the worker loads is left out of the garbage collector's full collections
(with 100,000 nodes each one walked 400,000 objects, 165 ms with every request
waiting: bench.large's cycles during an export)."""

import gc
import weakref

from molteniron.config import Config
from molteniron.workers.worker import Worker
from tests.conftest import empty_tables
from tests.keeper import add_request, commit, request


def tracked(record: object) -> bool:
    """record is among the objects the collector's collections walk."""
    return any(o is record for o in gc.get_objects())


class Cyclic:
    def __init__(self):
        self.me = self


def test_the_pool_loaded_at_takeover_is_frozen_once_per_load(engine, database_url):
    empty_tables(engine)
    worker = Worker(Config(db_url=database_url), "heap-test")
    try:
        commit(worker.keeper, add_request("n1"))  # the first batch takes over: a load
        (record,) = worker.keeper.state.nodes.values()
        assert worker.keeper.state.loads == 1 and tracked(record)

        cyclic = Cyclic()  # like a connection the worker drops after a reconnect
        gone = weakref.ref(cyclic)
        worker._freeze_after_load()
        assert not tracked(record)
        del cyclic

        made_since: dict[str, list] = {"made after the freeze": []}  # a list in it: tracked
        commit(worker.keeper, request("status"))  # no load: nothing more to freeze
        worker._freeze_after_load()
        assert tracked(made_since)

        worker.keeper.reload_needed = True  # as after a database failure
        commit(worker.keeper, request("status"))
        (reloaded,) = worker.keeper.state.nodes.values()
        assert worker.keeper.state.loads == 2 and tracked(reloaded)
        worker._freeze_after_load()
        assert not tracked(reloaded)
        assert gone() is None, "frozen garbage in a reference cycle is collected at the next load"
    finally:
        gc.unfreeze()  # the test process keeps collecting as before
        worker.keeper.close()
