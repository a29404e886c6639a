"""The rank socket's framing (trillm/protocol/wire.py): frames split anywhere, compact pickling of step messages."""

from __future__ import annotations

import pickle

import attrs
import pytest

from trillm.protocol.api import SamplingParams, TokenLogprob
from trillm.protocol.step import SampledToken, SampleSpec, SeqStep, StepPlan, StepResult
from trillm.protocol.wire import FrameDecoder, compact_pickle, encode_frame


def plan() -> StepPlan:
    sampling = SamplingParams(temperature=0.7, top_k=5, seed=9, stop_token_ids=(3, 4), logit_bias=((7, 1.5),))
    spec = SampleSpec(sampling=sampling, output_index=2, eos_token_ids=(2,), history_token_ids=(1, 2), num_prompt_tokens=1)
    return StepPlan(step_id=4, seqs=(SeqStep(seq_id=1, token_ids=(5, 6), start_pos=0, block_table=(3,), sample=spec),
                                     SeqStep(seq_id=2, token_ids=(-1,), start_pos=9, block_table=(0, 1))))


def test_frames_split_at_every_byte_decode_to_equal_messages() -> None:
    messages = [plan(), StepResult(step_id=4, sampled=(SampledToken(seq_id=1, token_id=8, logprob=TokenLogprob(
        token_id=8, logprob=-0.5, top=((8, -0.5), (9, -1.0)))),)), {"config": 1}, "x" * 70_000]
    data = b"".join(encode_frame(message) for message in messages)
    decoder, received = FrameDecoder(), []
    for index in range(0, len(data), 997):
        decoder.feed(data[index : index + 997])
        while (message := decoder.next_message()) is not None:
            received.append(message)
    assert received == messages
    assert decoder.next_message() is None


def test_step_messages_pickle_as_tuples_and_come_back_equal_and_frozen() -> None:
    original = plan()
    assert type(original.seqs[0].sample.__getstate__()) is tuple  # type: ignore[union-attr]
    copy = pickle.loads(pickle.dumps(original, protocol=5))
    assert copy == original and copy is not original
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        copy.seqs[0].start_pos = 3  # type: ignore[misc]


def test_compact_pickle_refuses_a_one_field_class() -> None:
    @attrs.frozen
    class One:
        value: int

    with pytest.raises(AssertionError, match="one-field class"):
        compact_pickle(One)
