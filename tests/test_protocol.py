"""The wire protocol's framing, in memory: no processes."""

import pytest

from _trio_parallel_fs_worker import _protocol as p


def test_frame_round_trip():
    reader = p.FrameReader()
    reader.feed(p.encode_frame(p.JOB, b"payload", flags=3))
    assert reader.next_frame() == (p.JOB, 3, b"payload")
    assert reader.next_frame() is None
    assert reader.pending == 0


def test_frames_cut_anywhere_come_out_whole_and_in_order():
    stream = p.encode_frame(p.VALUE, b"first") + p.encode_frame(p.ERROR, b"") + p.encode_frame(p.BYE)
    for cut in range(len(stream) + 1):
        reader = p.FrameReader()
        frames = []
        for piece in (stream[:cut], stream[cut:]):
            reader.feed(piece)
            while (frame := reader.next_frame()) is not None:
                frames.append(frame)
        assert frames == [(p.VALUE, 0, b"first"), (p.ERROR, 0, b""), (p.BYE, 0, b"")]


def test_unknown_kind_is_a_protocol_error():
    reader = p.FrameReader()
    reader.feed(p.HEADER.pack(99, 0, 0))
    with pytest.raises(p.ProtocolError, match="unknown frame kind 99"):
        reader.next_frame()


def test_control_records_parse_with_leftover():
    data = p.CONTROL_RECORD.pack(p.FORK, 0) + p.CONTROL_RECORD.pack(p.KILL, 7)
    records, rest = p.parse_records(data + b"\x00\x01", p.CONTROL_RECORD)
    assert records == [(p.FORK, 0), (p.KILL, 7)]
    assert rest == b"\x00\x01"


def test_status_records_carry_negative_and_large_values():
    data = p.STATUS_RECORD.pack(p.PID, 123) + p.STATUS_RECORD.pack(p.CEILING, 5 * 2**40)
    records, rest = p.parse_records(data, p.STATUS_RECORD)
    assert records == [(p.PID, 123), (p.CEILING, 5 * 2**40)]
    assert rest == b""


def test_a_large_payload_can_be_read_into_its_own_buffer():
    frame = p.encode_frame(p.JOB, b"y" * 1000)
    reader = p.FrameReader()
    reader.feed(frame[:300])
    assert reader.peek_header() == (p.JOB, 0, 1000)
    start = reader.take_payload_start()
    assert start == b"y" * (300 - p.HEADER.size)
    assert reader.pending == 0
