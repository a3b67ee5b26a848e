"""The sans-IO wire protocol, in memory: no processes, no sockets."""

from __future__ import annotations

import pickle
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _trio_parallel_fs_worker import protocol as p
from _trio_parallel_fs_worker._settings import TemplateSettings, WorkerSettings
from _trio_parallel_fs_worker.protocol import descriptor as d
from _trio_parallel_fs_worker.protocol import framing

WORKER_SETTINGS = WorkerSettings(cwd="/", sys_path=None, preload=(), template_init=None, hooks=b"hooks")
TEMPLATE_SETTINGS = TemplateSettings(
    sys_path=["/lib"], preload=("json",), template_init=None, memory_ceiling=None, memory_metric="uss"
)


def stream(sender: p.Connection, events: list[p.Event]) -> bytes:
    return b"".join(bytes(part) for event in events for part in sender.send(event))


def drain(receiver: p.Connection) -> list[p.Event]:
    events = []
    while (event := receiver.next_event()) is not p.NEED_DATA:
        events.append(event)
        if isinstance(event, p.Closed):
            break
    return events


def describe(event: object) -> tuple:
    """A comparable summary of an event (events do not define equality)."""
    fields = {name: getattr(event, name) for name in getattr(type(event), "__slots__", ()) if hasattr(event, name)}
    for name in ("pickled", "payload", "area"):
        if fields.get(name) is not None:
            fields[name] = bytes(fields[name])
    if "buffers" in fields:
        fields["buffers"] = [bytes(buffer) for buffer in fields["buffers"]]
    return (type(event).__name__, sorted(fields.items()))


def worker_events() -> list[p.Event]:
    big = memoryview(bytearray(range(256)) * 400)  # > LARGE_PAYLOAD: read into its own buffer
    return [
        p.Started(-1),
        p.Value(b"result"),
        p.Value(b"pickle", [memoryview(b"x" * 100), memoryview(b"")], p.Retire.MAX_JOBS),
        p.Error(b"error", p.Retire.MEMORY),
        p.Value(b"big", [big]),
        p.Error(b"hook", p.Retire.HOOK_FAILED),
        p.InitFailed(b"init"),
        p.Bye(),
    ]


def parent_events() -> list[p.Event]:
    return [
        p.Config(WORKER_SETTINGS),
        p.Job(b"job"),
        p.Job(b"job with buffers", [memoryview(b"abc" * 30000), memoryview(bytearray(7))]),
        p.Job(b""),
    ]


@pytest.mark.parametrize(
    ("sender_role", "receiver_role", "events"),
    [(p.WORKER, p.PARENT, worker_events()), (p.PARENT, p.WORKER, parent_events())],
)
def test_every_split_point_gives_the_same_events(sender_role, receiver_role, events):
    data = stream(p.Connection(sender_role), events)
    expected = [describe(event) for event in events]
    # Every cut of the stream into two reads; a cut every 997 bytes is enough
    # inside the large payloads, every byte elsewhere.
    cuts = [cut for cut in range(len(data) + 1) if cut < 2000 or cut > len(data) - 2000 or cut % 997 == 0]
    for cut in cuts:
        receiver = p.Connection(receiver_role)
        got = []
        for piece in (data[:cut], data[cut:]):
            receiver.receive_data(piece) if piece else None
            got.extend(drain(receiver))
        receiver.receive_data(b"")
        got.extend(drain(receiver))
        assert [describe(event) for event in got[:-1]] == expected, cut
        assert isinstance(got[-1], p.Closed) and not got[-1].mid_frame


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=70000), min_size=1, max_size=30),
    st.lists(st.booleans(), min_size=1, max_size=30),
)
def test_any_chunking_gives_the_same_events(sizes, into_buffer):
    events = worker_events()
    stream_bytes = stream(p.Connection(p.WORKER), events)
    receiver = p.Connection(p.PARENT)
    got = []
    position = 0
    step = 0
    while position < len(stream_bytes):
        size = sizes[step % len(sizes)]
        use_buffer = into_buffer[step % len(into_buffer)]
        step += 1
        # Sometimes, read a large payload straight into its own buffer.
        buffer = receiver.payload_buffer()
        if buffer is not None and use_buffer:
            count = min(size, len(buffer), len(stream_bytes) - position)
            buffer[:count] = stream_bytes[position : position + count]
            receiver.received(count)
        else:
            count = size
            receiver.receive_data(stream_bytes[position : position + count])
        position += count
        got.extend(drain(receiver))
    assert [describe(event) for event in got] == [describe(event) for event in events]


@pytest.mark.parametrize("cut", [1, p.HEADER.size - 1, p.HEADER.size, p.HEADER.size + 3])
def test_a_partial_frame_at_eof_is_closed_mid_frame(cut):
    data = stream(p.Connection(p.WORKER), [p.Value(b"result!")])
    receiver = p.Connection(p.PARENT)
    receiver.receive_data(data[:cut])
    assert receiver.next_event() is p.NEED_DATA
    receiver.receive_data(b"")
    event = receiver.next_event()
    assert isinstance(event, p.Closed) and event.mid_frame


def test_a_large_payload_cut_short_at_eof_is_closed_mid_frame():
    data = stream(p.Connection(p.WORKER), [p.Value(b"z" * 200_000)])
    receiver = p.Connection(p.PARENT)
    receiver.receive_data(data[:1000])
    buffer = receiver.payload_buffer()
    assert buffer is not None and len(buffer) == 200_000 - (1000 - p.HEADER.size)
    buffer[:500] = data[1000:1500]
    receiver.received(500)
    assert receiver.next_event() is p.NEED_DATA
    receiver.received(0)  # EOF
    event = receiver.next_event()
    assert isinstance(event, p.Closed) and event.mid_frame


def test_bytes_after_a_reply_stay_pending_for_the_next_event():
    """A Bye read in part right after a reply is not an error: it waits for the rest."""
    data = stream(p.Connection(p.WORKER), [p.Value(b"r" * 65_000), p.Bye()])
    receiver = p.Connection(p.PARENT)
    receiver.receive_data(data[:-1])
    assert isinstance(receiver.next_event(), p.Value)
    assert receiver.next_event() is p.NEED_DATA
    assert receiver.pending == p.HEADER.size - 1
    receiver.receive_data(data[-1:])
    assert isinstance(receiver.next_event(), p.Bye)


def frame(kind: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return p.HEADER.pack(kind, flags, len(payload)) + payload


CONFIG = frame(p.CONFIG, pickle.dumps(WORKER_SETTINGS))  # a worker's start-up message


@pytest.mark.parametrize(
    ("role", "data", "message"),
    [
        (p.PARENT, frame(99), "unknown frame kind 99"),
        (p.WORKER, frame(0), "unknown frame kind 0"),
        (p.PARENT, frame(p.JOB, b"x"), "the parent received a JOB frame, which only it sends"),
        (p.WORKER, frame(p.VALUE, b"x"), "the worker received a VALUE frame, which only it sends"),
        (p.PARENT, frame(p.VALUE, b"x", flags=9), "unknown retire reason 9 in a VALUE frame"),
        (p.PARENT, frame(p.BYE, flags=1), "a BYE frame with flags 1"),
        (p.PARENT, frame(p.BYE, b"junk"), "a BYE frame with 4 payload bytes"),
        (p.PARENT, frame(p.STARTED, b"123"), "a STARTED frame of 3 bytes, not 8"),
        (p.WORKER, frame(p.JOB, b"x"), "expected a CONFIG frame first, got JOB"),
        (p.WORKER, CONFIG + CONFIG, "a second CONFIG frame"),
        (p.PARENT, frame(p.VALUE_BUFFERS, b"\0\0"), "a buffer table that does not fit its payload"),
        (
            p.PARENT,
            frame(p.VALUE_BUFFERS, b"\0\0\0\0" + (5).to_bytes(8, "big") + b"abc"),
            "buffer lengths do not add up to the payload",
        ),
    ],
)
def test_malformed_or_misdirected_frames_are_one_error_type(role, data, message):
    receiver = p.Connection(role)
    receiver.receive_data(data)
    with pytest.raises(p.ProtocolError, match=message):
        while receiver.next_event() is not p.NEED_DATA:
            pass


@pytest.mark.parametrize(
    ("role", "data", "message"),
    [
        (p.WORKER, frame(p.JOB, b"x"), "expected a CONFIG frame first, got JOB"),
        (p.PARENT, frame(p.JOB, b"x"), "the parent received a JOB frame, which only it sends"),
        (p.WORKER, frame(p.VALUE, b"x"), "the worker received a VALUE frame, which only it sends"),
        (p.PARENT, frame(p.VALUE, b"x", flags=9), "unknown retire reason 9 in a VALUE frame"),
        (p.PARENT, frame(99), "unknown frame kind 99"),
    ],
)
def test_the_warm_path_refuses_what_next_event_refuses(role, data, message):
    with pytest.raises(p.ProtocolError, match=message):
        p.Connection(role).next_event_from(data)


def configured_worker() -> p.Connection:
    receiver = p.Connection(p.WORKER)
    assert isinstance(receiver.next_event_from(CONFIG), p.Config)
    return receiver


@pytest.mark.parametrize(
    ("sender_role", "events", "receiver"),
    [
        (p.WORKER, worker_events(), lambda: p.Connection(p.PARENT)),
        (p.PARENT, parent_events()[1:], configured_worker),
    ],
)
def test_the_warm_path_gives_the_events_of_receive_data_and_next_event(sender_role, events, receiver):
    """next_event_from, fed one event's bytes, two events' bytes, or a part of
    one, agrees with receive_data and next_event."""
    sender = p.Connection(sender_role)
    for event in events:
        data = stream(sender, [event])
        warm = receiver()
        assert [describe(warm.next_event_from(data))] == [describe(event)]
        assert warm.pending == 0 and warm.next_event() is p.NEED_DATA
    data = stream(sender, events[:2])
    warm = receiver()
    first = warm.next_event_from(data)
    assert [describe(first), *map(describe, drain(warm))] == [describe(e) for e in events[:2]]
    warm = receiver()
    assert warm.next_event_from(data[:5]) is p.NEED_DATA
    assert warm.pending == 5
    assert describe(warm.next_event_from(data[5 : len(stream(sender, events[:1]))])) == describe(events[0])


def test_the_warm_path_sees_the_end():
    warm = configured_worker()
    closed = warm.next_event_from(b"")
    assert isinstance(closed, p.Closed) and not closed.mid_frame


def test_a_plain_value_is_framed_as_frame_parts_frames_it():
    for retire in p.Retire:
        value = p.Value(b"pickle", retire=retire)
        assert p.Connection(p.WORKER).send(value) == framing.frame_parts(p.VALUE, b"pickle", [], retire)


def test_an_unknown_kind_is_refused_before_its_payload_arrives():
    receiver = p.Connection(p.PARENT)
    receiver.receive_data(p.HEADER.pack(77, 0, 10**9))  # the header alone
    with pytest.raises(p.ProtocolError, match="unknown frame kind 77"):
        receiver.payload_buffer()


def test_each_end_sends_only_its_own_events():
    with pytest.raises(p.ProtocolError, match="the parent cannot send Value"):
        p.Connection(p.PARENT).send(p.Value(b""))
    with pytest.raises(p.ProtocolError, match="the worker cannot send Job"):
        p.Connection(p.WORKER).send(p.Job(b""))
    with pytest.raises(ValueError, match="our_role must be"):
        p.Connection("stranger")
    with pytest.raises(ValueError, match="a worker does not talk to a template"):
        p.Connection(p.WORKER, p.TEMPLATE)


def test_retire_reasons_have_the_names_statistics_count():
    assert {reason: reason.reason for reason in p.Retire} == {
        p.Retire.KEEP: "",
        p.Retire.MAX_JOBS: "jobs",
        p.Retire.MEMORY: "memory",
        p.Retire.USER: "user",
        p.Retire.HOOK_FAILED: "hook_error",
        p.Retire.AREA_HELD: "area",
    }


def test_buffers_arrive_aligned_and_writable():
    events = [p.Value(b"pickle!", [memoryview(b"a" * 70_000), memoryview(b"b" * 3)])]
    receiver = p.Connection(p.PARENT)
    receiver.receive_data(stream(p.Connection(p.WORKER), events))
    (value,) = drain(receiver)
    assert [bytes(buffer) for buffer in value.buffers] == [b"a" * 70_000, b"b" * 3]
    first = value.buffers[0]
    assert not first.readonly
    assert first.obj is value.buffers[1].obj  # views of one receive buffer, no copies


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


# --- the shared memory area's frames ------------------------------------------------


def descriptor(area_size: int, *extents: tuple[int, int]) -> bytes:
    return d.encode_descriptor(d.Descriptor(area_size, tuple(extents)))


def area_conversation() -> tuple[list[p.Event], list[p.Event]]:
    """A parent's events (Config, Area, jobs in the area) and a worker's replies."""
    parent = [
        p.Config(WORKER_SETTINGS),
        p.Area(1 << 30, 1 << 20),
        p.Job(b"job in the area", area=descriptor(4 << 20, (0, 3 << 20), (3 << 20, 5))),
        p.Job(b"job over the socket", [memoryview(b"q" * 70_000)]),
        p.Job(b"x" * 70_000, area=descriptor(1 << 20)),  # a large pickle, no buffers
    ]
    worker = [
        p.Value(b"value in the area", retire=p.Retire.KEEP, area=descriptor(8 << 20, (4 << 20, 4 << 20))),
        p.Value(b"v", retire=p.Retire.AREA_HELD, area=descriptor(8 << 20, (0, 64), (64, 0))),
    ]
    return parent, worker


def test_area_frames_survive_every_split_point():
    parent_events, worker_events_ = area_conversation()
    for sender_role, receiver_role, events in [
        (p.PARENT, p.WORKER, parent_events),
        (p.WORKER, p.PARENT, worker_events_),
    ]:
        data = stream(p.Connection(sender_role), events)
        expected = [describe(event) for event in events]
        cuts = [cut for cut in range(len(data) + 1) if cut < 3000 or cut > len(data) - 500 or cut % 997 == 0]
        for cut in cuts:
            receiver = p.Connection(receiver_role)
            if receiver_role == p.PARENT:
                receiver.send(p.Area(1 << 30, 1 << 20))  # the parent sent the area first
            got = []
            for piece in (data[:cut], data[cut:]):
                receiver.receive_data(piece) if piece else None
                got.extend(drain(receiver))
            assert [describe(event) for event in got] == expected, (sender_role, cut)


def test_an_area_frame_carries_cap_and_threshold_not_the_fd():
    worker = p.Connection(p.WORKER)
    worker.receive_data(stream(p.Connection(p.PARENT), [p.Config(WORKER_SETTINGS), p.Area(12345, 678, fd=99)]))
    config, area = drain(worker)
    assert isinstance(area, p.Area)
    assert (area.cap, area.threshold, area.fd) == (12345, 678, -1)  # the I/O layer fills the fd in


def test_an_area_job_resolves_to_its_descriptor_and_pickle():
    worker = p.Connection(p.WORKER)
    encoded = descriptor(2 << 20, (0, 1 << 20), (1 << 20, 7))
    worker.receive_data(
        stream(p.Connection(p.PARENT), [p.Config(WORKER_SETTINGS), p.Area(4 << 20, 1), p.Job(b"pkl", area=encoded)])
    )
    *_, job = drain(worker)
    assert isinstance(job, p.Job)
    assert bytes(job.pickled) == b"pkl" and bytes(job.area) == encoded and job.buffers == []
    assert d.decode_descriptor(job.area) == d.Descriptor(2 << 20, ((0, 1 << 20), (1 << 20, 7)))


def test_the_parent_sends_one_area_per_channel():
    parent = p.Connection(p.PARENT)
    parent.send(p.Area(100, 1))
    with pytest.raises(p.ProtocolError, match="has its shared memory area already"):
        parent.send(p.Area(100, 1))
    with pytest.raises(p.ProtocolError, match="the worker cannot send Area"):
        p.Connection(p.WORKER).send(p.Area(100, 1))


AREA = CONFIG + frame(p.AREA, (1 << 20).to_bytes(8, "big") + (5).to_bytes(8, "big"))


@pytest.mark.parametrize(
    ("role", "data", "message"),
    [
        (p.WORKER, CONFIG + frame(p.JOB_AREA, descriptor(64)), "a JOB_AREA frame before any AREA frame"),
        (p.PARENT, frame(p.VALUE_AREA, descriptor(64)), "a VALUE_AREA frame before any AREA frame"),
        (p.PARENT, frame(p.AREA, bytes(16)), "the parent received a AREA frame, which only it sends"),
        (p.WORKER, CONFIG + frame(p.AREA, b"short"), "an AREA frame of 5 bytes, not 16"),
        (p.WORKER, AREA + frame(p.AREA, bytes(16)), "a second AREA frame"),
        (p.WORKER, AREA + frame(p.JOB_AREA, b"tiny"), "JOB_AREA frame with a malformed shared memory descriptor"),
        (
            p.WORKER,
            # says 3 buffers, holds one
            AREA + frame(p.JOB_AREA, (64).to_bytes(8, "big") + (3).to_bytes(4, "big") + bytes(16)),
            "malformed shared memory descriptor: a shared memory descriptor of 3 buffers has 76 bytes",
        ),
        (
            p.WORKER,
            AREA + frame(p.JOB_AREA, descriptor(128, (3, 10)) + b"pickle"),
            "malformed shared memory descriptor: buffer extent \\(offset 3, length 10\\) is not aligned",
        ),
        (
            p.WORKER,
            AREA + frame(p.JOB_AREA, descriptor(128, (64, 100))),
            "passes the area's end \\(128\\)",
        ),
        (
            p.WORKER,
            AREA + frame(p.JOB_AREA, descriptor(128, (64, 10), (0, 10))),
            "overlaps the previous buffer",
        ),
        (
            p.WORKER,
            AREA + frame(p.JOB_AREA, descriptor(2 << 20)),
            "says the shared memory area has 2097152 bytes, above its cap of 1048576",
        ),
        (p.WORKER, AREA + frame(p.JOB_AREA, descriptor(64), flags=1), "a JOB_AREA frame with flags 1"),
    ],
)
def test_malformed_area_frames_are_protocol_errors(role, data, message):
    receiver = p.Connection(role)
    receiver.receive_data(data)
    with pytest.raises(p.ProtocolError, match=message):
        while receiver.next_event() is not p.NEED_DATA:
            pass


def test_a_value_area_frame_with_a_bad_retire_reason_is_refused():
    receiver = p.Connection(p.PARENT)
    receiver.send(p.Area(1 << 20, 1))
    receiver.receive_data(frame(p.VALUE_AREA, descriptor(64), flags=42))
    with pytest.raises(p.ProtocolError, match="unknown retire reason 42 in a VALUE_AREA frame"):
        receiver.next_event()


# --- shared memory descriptors: records the protocol carries ----------------------


def layout(lengths: list[int]) -> tuple[tuple[tuple[int, int], ...], int]:
    """Extents for buffers of these lengths, each at an aligned offset."""
    extents, end = [], 0
    for length in lengths:
        offset = -(-end // d.ALIGN) * d.ALIGN
        extents.append((offset, length))
        end = offset + length
    return tuple(extents), end


@given(
    area_size=st.integers(0, 2**63),
    lengths=st.lists(st.integers(0, 2**20), max_size=8),
)
def test_descriptor_round_trip(area_size: int, lengths: list[int]):
    extents, end = layout(lengths)
    descriptor = d.Descriptor(max(area_size, end), extents)
    encoded = d.encode_descriptor(descriptor)
    assert len(encoded) == 28 + 16 * len(lengths)
    assert d.decode_descriptor(encoded) == descriptor
    assert d.decode_descriptor(memoryview(encoded)) == descriptor


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\0" * 27, "at least 28 bytes, this one 27"),
        (struct.pack("!QIQQ", 4096, 2, 0, 0) + struct.pack("!QQ", 0, 8), "of 2 buffers has 60 bytes, this one 44"),
        (struct.pack("!QIQQ", 4096, 1, 0, 0) + struct.pack("!QQ", 8, 8), r"offset 8, length 8\) is not aligned"),
        (struct.pack("!QIQQ", 4096, 1, 0, 0) + struct.pack("!QQ", 4032, 128), r"passes the area's end \(4096\)"),
        (struct.pack("!QIQQ", 4096, 0, 128, 64), r"window starts at 128, after it ends \(64\)"),
        (
            struct.pack("!QIQQ", 4096, 2, 0, 0) + struct.pack("!QQQQ", 0, 100, 64, 8),
            r"overlaps the previous buffer \(which ends at 100\)",
        ),
    ],
)
def test_malformed_descriptors_are_refused(data: bytes, message: str):
    with pytest.raises(d.DescriptorError, match=message):
        d.decode_descriptor(data)


def test_descriptor_length_finds_where_the_pickle_starts():
    encoded = d.encode_descriptor(d.Descriptor(4096, ((0, 10), (64, 5))))
    assert d.descriptor_length(encoded + b"pickle") == len(encoded) == 28 + 2 * 16
    with pytest.raises(d.DescriptorError, match="has 60 bytes, but only 59 arrived"):
        d.descriptor_length(encoded[:-1])
    with pytest.raises(d.DescriptorError, match="at least 28 bytes"):
        d.descriptor_length(b"short")


# --- typed start-up messages and the template's handshake ---------------------------


def test_a_workers_config_arrives_as_its_settings():
    worker = p.Connection(p.WORKER)
    worker.receive_data(stream(p.Connection(p.PARENT), [p.Config(WORKER_SETTINGS)]))
    (config,) = drain(worker)
    assert isinstance(config, p.Config) and config.settings == WORKER_SETTINGS
    assert type(config.settings) is WorkerSettings


def test_the_templates_handshake_is_typed_events_both_ways():
    parent, template = p.Connection(p.PARENT, p.TEMPLATE), p.Connection(p.TEMPLATE)
    template.receive_data(stream(parent, [p.Config(TEMPLATE_SETTINGS)]))
    (config,) = drain(template)
    assert isinstance(config, p.Config) and config.settings == TEMPLATE_SETTINGS
    parent.receive_data(stream(template, [p.Ready(4321)]))
    (ready,) = drain(parent)
    assert isinstance(ready, p.Ready) and ready.pid == 4321
    failed = p.Connection(p.PARENT, p.TEMPLATE)
    failed.receive_data(stream(p.Connection(p.TEMPLATE), [p.InitFailed(b"the import error")]))
    (init_failed,) = drain(failed)
    assert isinstance(init_failed, p.InitFailed) and init_failed.payload == b"the import error"


def test_each_conversation_carries_only_its_own_events():
    with pytest.raises(p.ProtocolError, match="the template cannot send Value"):
        p.Connection(p.TEMPLATE).send(p.Value(b""))
    with pytest.raises(p.ProtocolError, match="the worker cannot send Ready"):
        p.Connection(p.WORKER).send(p.Ready(1))
    with pytest.raises(p.ProtocolError, match="the parent cannot send Job"):
        p.Connection(p.PARENT, p.TEMPLATE).send(p.Job(b""))
    parent = p.Connection(p.PARENT)
    parent.receive_data(frame(p.READY, bytes(8)))
    with pytest.raises(p.ProtocolError, match="the parent received a READY frame, which only it sends"):
        parent.next_event()
    template = p.Connection(p.TEMPLATE)
    template.receive_data(frame(p.JOB, b"x"))
    with pytest.raises(p.ProtocolError, match="the template received a JOB frame"):
        template.next_event()


def test_a_config_holds_the_settings_of_the_end_it_goes_to():
    with pytest.raises(TypeError, match="a worker's Config holds a WorkerSettings"):
        p.Connection(p.PARENT).send(p.Config(TEMPLATE_SETTINGS))
    with pytest.raises(TypeError, match="a template's Config holds a TemplateSettings"):
        p.Connection(p.PARENT, p.TEMPLATE).send(p.Config(WORKER_SETTINGS))


@pytest.mark.parametrize(
    ("role", "data", "message"),
    [
        (p.WORKER, frame(p.CONFIG, pickle.dumps(TEMPLATE_SETTINGS)), "holds a TemplateSettings, not WorkerSettings"),
        (p.TEMPLATE, frame(p.CONFIG, pickle.dumps({"preload": ()})), "holds a dict, not TemplateSettings"),
        (p.WORKER, frame(p.CONFIG, b"not a pickle"), "a CONFIG frame whose settings do not unpickle"),
        (p.TEMPLATE, CONFIG, "holds a WorkerSettings, not TemplateSettings"),
    ],
)
def test_a_config_of_the_wrong_type_or_malformed_is_refused(role, data, message):
    receiver = p.Connection(role)
    receiver.receive_data(data)
    with pytest.raises(p.ProtocolError, match=message):
        receiver.next_event()


@pytest.mark.parametrize("payload", [b"", bytes(7), bytes(9)])
def test_a_ready_frame_holds_exactly_a_pid(payload):
    parent = p.Connection(p.PARENT, p.TEMPLATE)
    parent.receive_data(frame(p.READY, payload))
    with pytest.raises(p.ProtocolError, match=f"a READY frame of {len(payload)} bytes, not 8"):
        parent.next_event()


def test_the_template_must_get_its_config_first():
    template = p.Connection(p.TEMPLATE)
    template.receive_data(frame(p.CONFIG, pickle.dumps(TEMPLATE_SETTINGS)) * 2)
    assert isinstance(template.next_event(), p.Config)
    with pytest.raises(p.ProtocolError, match="a second CONFIG frame"):
        template.next_event()


def test_the_protocol_imports_no_transport():
    """Descriptors are records the protocol carries; only _shm interprets them.
    The protocol's rooms import the standard library, each other and the
    settings records, nothing else of the child package."""
    import ast
    from pathlib import Path

    folder = Path(p.__file__).parent
    outside = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level > 1:
                    outside.add(node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                outside.update(name for name in names if name.split(".")[0] not in sys.stdlib_module_names)
    assert outside == {"_settings"}
