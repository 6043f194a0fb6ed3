"""What the broker's confirms and returns make of grants in flight (workers/grants.py)."""

from __future__ import annotations

from molteniron.workers.grants import DELIVERED, FORGET, UNDO, Grant, GrantTracker


def sent(tracker: GrantTracker, *ids: str) -> None:
    for seq, request_id in enumerate(ids, start=len(tracker.in_flight) + 1):
        tracker.add(Grant(request_id, f"q-{request_id}", request_id, b"{}"))
        tracker.sent(tracker.pending[request_id], seq)


def test_a_multiple_confirm_settles_every_copy_up_to_its_tag_and_no_later_one():
    tracker = GrantTracker()
    sent(tracker, "a", "b", "c")
    tracker.on_return("b", "q-b")
    tracker.on_confirm(2, multiple=True, ack=True)
    assert tracker.take_settled() == {"a": DELIVERED, "b": UNDO}
    assert list(tracker.in_flight.values()) == ["c"]
    tracker.on_confirm(3, multiple=False, ack=True)
    assert tracker.take_settled() == {"c": DELIVERED}


def test_a_nack_sends_again_and_a_copy_sent_again_that_bounces_is_left_to_the_lease():
    tracker = GrantTracker()
    sent(tracker, "a")
    tracker.on_confirm(1, multiple=False, ack=False)
    assert [g.request_id for g in tracker.to_send()] == ["a"]
    tracker.sent(tracker.pending["a"], 2)
    tracker.connection_lost()  # the copy may have reached the client
    tracker.sent(tracker.pending["a"], 1)
    tracker.on_return("a", "q-a")
    tracker.on_confirm(1, multiple=False, ack=True)
    assert tracker.take_settled() == {"a": FORGET}


def test_a_grant_answered_again_to_a_moved_client_is_not_undone_by_the_first_copy_bounce():
    # The client lost its broker, sent its allocate again from a new reply queue and
    # got the grant there; the first copy's queue died with the broker node.
    tracker = GrantTracker()
    sent(tracker, "in-flight", "settled")
    tracker.on_return("settled", "q-settled")
    tracker.on_confirm(2, multiple=False, ack=True)  # bounced and settled: undo, not yet written
    tracker.regranted(["in-flight", "settled"])
    tracker.on_return("in-flight", "q-in-flight")
    tracker.on_confirm(1, multiple=False, ack=True)
    assert tracker.take_settled() == {"in-flight": FORGET, "settled": FORGET}


def test_a_reply_under_a_grant_id_bouncing_from_another_queue_does_not_undo_the_grant():
    # Another user sent a request under the grant's id, with a reply queue that does not
    # exist: its refusal bounced. The grant itself reached its client.
    tracker = GrantTracker()
    sent(tracker, "a")
    assert not tracker.on_return("a", "amq.gen-not-the-clients-queue")
    tracker.on_confirm(1, multiple=False, ack=True)
    assert tracker.take_settled() == {"a": DELIVERED}
