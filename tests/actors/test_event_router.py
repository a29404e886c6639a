"""EventRouter: each step's events to their sequences' channels; a gone receiver aborts; what is left is failed."""

from __future__ import annotations

import trio

from trillm.actors.event_router import EventRouter
from trillm.protocol.api import FinishReason
from trillm.protocol.step import TokenEvent


def test_events_reach_their_channels_and_a_final_event_closes_one() -> None:
    router = EventRouter(abort=lambda seq_id: None)
    sends = {seq_id: trio.open_memory_channel[TokenEvent](4) for seq_id in (1, 2)}
    for seq_id, (send, _) in sends.items():
        router.register(seq_id, send)
    router.deliver([TokenEvent(seq_id=1, token_ids=(5,)), TokenEvent(seq_id=2, token_ids=(6,)),
                    TokenEvent(seq_id=1, token_ids=(7,), finish_reason=FinishReason.LENGTH)])
    assert [e.token_ids for e in (sends[1][1].receive_nowait(), sends[1][1].receive_nowait())] == [(5,), (7,)]
    assert sends[2][1].receive_nowait().token_ids == (6,)
    assert len(router) == 1  # seq 1 finished: its channel is closed and forgotten
    router.deliver([TokenEvent(seq_id=1, token_ids=(9,))])  # a late event of a finished sequence is dropped


def test_a_gone_receiver_asks_for_an_abort_once() -> None:
    aborted: list[int] = []
    router = EventRouter(abort=aborted.append)
    send, receive = trio.open_memory_channel[TokenEvent](4)
    router.register(3, send)
    receive.close()  # the client left
    router.deliver([TokenEvent(seq_id=3, token_ids=(1,)), TokenEvent(seq_id=3, token_ids=(2,))])
    assert aborted == [3] and len(router) == 0


def test_fail_all_ends_every_routed_sequence_with_the_error() -> None:
    router = EventRouter(abort=lambda seq_id: None)
    channels = [trio.open_memory_channel[TokenEvent](4) for _ in range(3)]
    for seq_id, (send, _) in enumerate(channels):
        router.register(seq_id, send)
    router.fail_all("rank 0 died")
    for seq_id, (_, receive) in enumerate(channels):
        assert receive.receive_nowait() == TokenEvent(seq_id=seq_id, error="rank 0 died")
    assert len(router) == 0
