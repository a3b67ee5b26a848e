"""One end of a conversation, as a state machine over bytes (h11's shape).

``send(event)`` turns an event into the byte pieces of one frame,
``receive_data(bytes)`` feeds what arrived, and ``next_event()`` hands back
typed events, checked against what that end may receive. Every frame either
end writes comes from `Connection.send`: nothing else frames. The I/O around
it differs (blocking in the worker and the template, Trio in the parent) and
lives with each side; nothing here reads or writes a socket.

Conversation on one worker channel (roles `PARENT` and `WORKER`)::

    parent                          worker
    Config (first frame only)  ->
    Area  (+ fd; at most once) ->
                               <-   InitFailed   (init raised; worker exits)
                               <-   Started      (init done; only if an init
                                                  hook or max_memory is set)
    Job                        ->
                               <-   Value | Error (carries a Retire reason)
                               <-   Bye          (idle timeout; worker exits)
    EOF                        ->   worker exits cleanly

The template's handshake (roles `PARENT` and `TEMPLATE`)::

    Config (TemplateSettings)  ->
                               <-   Ready | InitFailed (the preload raised)

after which its control channel carries fixed records (see `control`).

On an AF_UNIX worker channel, buffers that reach a threshold travel through
the worker's shared memory area instead of the socket (``_shm``): the parent
sends one ``Area`` event, whose file descriptor rides on the same ``sendmsg``
(SCM_RIGHTS), before the first job that needs it; from then on a Job or Value
may carry an encoded `descriptor.Descriptor` (where its buffers lie in the
area) instead of buffers. The Connection checks descriptors but never touches
the area or the fd: the I/O layer of each end does. A worker that retires says
so in the flags of its last result, so the parent never sends a job to a
worker that is leaving. A Bye can only follow a reply.
"""

from __future__ import annotations

import pickle
import struct

from .._settings import TemplateSettings, WorkerSettings
from .events import (
    NEED_DATA,
    Area,
    Bye,
    Closed,
    Config,
    Error,
    Event,
    InitFailed,
    Job,
    ProtocolError,
    Ready,
    Retire,
    Started,
    Value,
    _NeedData,
)
from .framing import (
    _HEADER_SIZE,
    AREA,
    BYE,
    CONFIG,
    ERROR,
    HEADER,
    INIT_FAILED,
    JOB,
    JOB_AREA,
    JOB_BUFFERS,
    READY,
    STARTED,
    VALUE,
    VALUE_AREA,
    VALUE_BUFFERS,
    FrameReader,
    Kind,
    area_parts,
    check_kind,
    encode_frame,
    frame_parts,
    split_area,
    split_buffers,
)

PARENT = "parent"
WORKER = "worker"
TEMPLATE = "template"

# Who talks to whom by default: a parent to a worker.
_PEER = {PARENT: WORKER, WORKER: PARENT, TEMPLATE: PARENT}

# The frame kinds each sender may send to each receiver.
_SENDS: dict[tuple[str, str], frozenset[int]] = {
    (PARENT, WORKER): frozenset({CONFIG, AREA, JOB, JOB_BUFFERS, JOB_AREA}),
    (WORKER, PARENT): frozenset({VALUE, VALUE_BUFFERS, VALUE_AREA, ERROR, INIT_FAILED, STARTED, BYE}),
    (PARENT, TEMPLATE): frozenset({CONFIG}),
    (TEMPLATE, PARENT): frozenset({READY, INIT_FAILED}),
}
# What the start-up message holds, by the role that receives it.
_SETTINGS: dict[str, type] = {WORKER: WorkerSettings, TEMPLATE: TemplateSettings}

_WITH_RETIRE = frozenset({VALUE, VALUE_BUFFERS, VALUE_AREA, ERROR})

# Retire reasons by flag value (a tuple index, not an Enum call).
_RETIRES = tuple(Retire)

_AREA = struct.Struct("!QQ")
_STARTED = struct.Struct("!q")
_READY = struct.Struct("!q")
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack


class Connection:
    """One end of a channel, as a state machine over bytes.

    ``our_role`` is `PARENT`, `WORKER` or `TEMPLATE`; ``their_role`` the other
    end's (by default: a parent talks to a worker, a worker or the template to
    the parent). Each end may only send and receive the events of its role
    towards the other, and a worker's or the template's first frame must be
    its Config.
    """

    def __init__(self, our_role: str, their_role: str | None = None) -> None:
        if our_role not in _PEER:
            raise ValueError(f"our_role must be {PARENT!r}, {WORKER!r} or {TEMPLATE!r}, not {our_role!r}")
        if their_role is None:
            their_role = _PEER[our_role]
        if (our_role, their_role) not in _SENDS:
            raise ValueError(f"a {our_role} does not talk to a {their_role}")
        self.our_role = our_role
        self.their_role = their_role
        self._sends = _SENDS[our_role, their_role]
        self._receives = _SENDS[their_role, our_role]
        # Looked up once: a job or a result goes on every call.
        self._sends_jobs = JOB in self._sends
        self._sends_values = VALUE in self._sends
        self._reader = FrameReader()
        self._eof = False
        self._configured = our_role == PARENT  # a worker and the template get their Config first
        self._area_cap: int | None = None  # set once the area is known on this channel

    # --- outgoing ---

    def send(self, event: Event) -> list[bytes | memoryview]:
        """The byte pieces of ``event``'s frame, to be written in order.

        For an `Area`, the I/O layer sends the area's fd with the first byte
        of this frame (SCM_RIGHTS). A Job or Value whose ``area`` is set has
        its buffers in the area already: only the descriptor and pickle go.
        """
        # Job and Value first: one per call, each way; a small job without
        # buffers (the warm call's) is framed right here.
        cls = type(event)
        if cls is Job:
            if not self._sends_jobs:
                raise self._not_ours(event)
            if event.area is not None:  # type: ignore[union-attr]
                return area_parts(JOB, event.area, event.pickled)  # type: ignore[union-attr]
            if not event.buffers:  # type: ignore[union-attr]
                pickled = event.pickled  # type: ignore[union-attr]
                return [_pack_header(JOB, 0, len(pickled)) + pickled]
            return frame_parts(JOB, event.pickled, event.buffers)  # type: ignore[arg-type, union-attr]
        if cls is Value:
            if not self._sends_values:
                raise self._not_ours(event)
            if event.area is not None:  # type: ignore[union-attr]
                return area_parts(VALUE, event.area, event.pickled, event.retire)  # type: ignore[union-attr]
            return frame_parts(VALUE, event.pickled, event.buffers, event.retire)  # type: ignore[arg-type, union-attr]
        kind = _KINDS.get(cls)
        if kind is None:
            raise TypeError(f"cannot send {event!r}")
        if kind not in self._sends:
            raise self._not_ours(event)
        if cls is Area:
            assert isinstance(event, Area)
            if self._area_cap is not None:
                raise ProtocolError("this channel has its shared memory area already")
            self._area_cap = event.cap
            return [encode_frame(AREA, _AREA.pack(event.cap, event.threshold))]
        if cls is Error:
            assert isinstance(event, Error)
            return [encode_frame(ERROR, event.payload, event.retire)]
        if cls is Config:
            assert isinstance(event, Config)
            expected = _SETTINGS[self.their_role]
            if type(event.settings) is not expected:
                raise TypeError(f"a {self.their_role}'s Config holds a {expected.__name__}, not {event.settings!r}")
            return [encode_frame(CONFIG, pickle.dumps(event.settings))]
        if cls is InitFailed:
            assert isinstance(event, InitFailed)
            return [encode_frame(INIT_FAILED, event.payload)]
        if cls is Started:
            assert isinstance(event, Started)
            return [encode_frame(STARTED, _STARTED.pack(event.memory))]
        if cls is Ready:
            assert isinstance(event, Ready)
            return [encode_frame(READY, _READY.pack(event.pid))]
        return [encode_frame(BYE)]

    def _not_ours(self, event: Event) -> ProtocolError:
        return ProtocolError(f"the {self.our_role} cannot send {type(event).__name__}")

    # --- incoming ---

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes that arrived; ``b""`` means the other end closed."""
        if not data:
            self._eof = True
        else:
            self._reader.feed(data)

    def next_event_from(self, data: bytes) -> Event | _NeedData:
        """`receive_data` then `next_event`, in one call: the warm path's.

        When nothing is buffered and ``data`` is exactly one frame (a small job
        or reply arrives so), its event is made from it without the framer.
        A warm call is dominated by what each process touches between two
        context switches, so this path is kept short.
        """
        reader = self._reader
        if type(data) is bytes and not reader._buffer and reader._large is None and len(data) >= _HEADER_SIZE:
            kind, flags, length = _unpack_header(data)
            if len(data) == _HEADER_SIZE + length:  # exactly one frame: no framer needed
                check_kind(kind)
                return self._event(kind, flags, data[_HEADER_SIZE:])
        self.receive_data(data)
        return self.next_event()

    def payload_buffer(self) -> memoryview | None:
        """Where to ``recv_into`` the rest of a large payload, if one is being read
        (then call `received`); None when an ordinary read will do."""
        return self._reader.payload_buffer()

    def received(self, count: int) -> None:
        if count == 0:
            self._eof = True
        else:
            self._reader.received(count)

    @property
    def pending(self) -> int:
        """Bytes received that are not part of an event handed out yet."""
        return self._reader.pending

    def next_event(self) -> Event | _NeedData:
        """The next event, `NEED_DATA` if more bytes are needed, or `Closed` at EOF.

        Raises:
            ProtocolError: for an unknown kind, a kind this end may not receive,
                bad flags, or a malformed payload.
        """
        frame = self._reader.next_frame()
        if frame is None:
            if self._eof:
                return Closed(mid_frame=self._reader.pending > 0)
            return NEED_DATA
        return self._event(*frame)

    def _event(self, kind: int, flags: int, payload: bytes | bytearray) -> Event:
        """The event of one whole frame, checked against what this end may receive."""
        if kind not in self._receives:
            raise ProtocolError(f"the {self.our_role} received a {Kind(kind).name} frame, which only it sends")
        if kind in _WITH_RETIRE:
            if flags >= len(_RETIRES):
                raise ProtocolError(f"unknown retire reason {flags} in a {Kind(kind).name} frame")
            retire = _RETIRES[flags]
        elif flags:
            raise ProtocolError(f"a {Kind(kind).name} frame with flags {flags}")
        if not self._configured:
            if kind != CONFIG:
                raise ProtocolError(f"expected a CONFIG frame first, got {Kind(kind).name}")
            self._configured = True
        elif kind == CONFIG:
            raise ProtocolError("a second CONFIG frame")
        if kind == VALUE:
            return Value(payload, [], retire)
        if kind == VALUE_BUFFERS:
            pickled, buffers = split_buffers(payload)
            return Value(pickled, buffers, retire)
        if kind == ERROR:
            return Error(bytes(payload), retire)
        if kind == JOB:
            return Job(payload)
        if kind == JOB_BUFFERS:
            pickled, buffers = split_buffers(payload)
            return Job(pickled, buffers)
        if kind == VALUE_AREA or kind == JOB_AREA:
            encoded, pickled, descriptor = split_area(payload, Kind(kind))
            if self._area_cap is None:
                raise ProtocolError(f"a {Kind(kind).name} frame before any AREA frame")
            if descriptor.area_size > self._area_cap:
                raise ProtocolError(
                    f"a {Kind(kind).name} frame says the shared memory area has {descriptor.area_size} bytes, "
                    f"above its cap of {self._area_cap}"
                )
            if kind == JOB_AREA:
                return Job(pickled, area=encoded)
            return Value(pickled, retire=retire, area=encoded)
        if kind == AREA:
            if self._area_cap is not None:
                raise ProtocolError("a second AREA frame")
            if len(payload) != _AREA.size:
                raise ProtocolError(f"an AREA frame of {len(payload)} bytes, not {_AREA.size}")
            cap, threshold = _AREA.unpack(payload)
            self._area_cap = cap
            return Area(cap, threshold)
        if kind == CONFIG:
            return Config(self._settings(payload))
        if kind == INIT_FAILED:
            return InitFailed(bytes(payload))
        if kind == STARTED:
            if len(payload) != _STARTED.size:
                raise ProtocolError(f"a STARTED frame of {len(payload)} bytes, not {_STARTED.size}")
            return Started(_STARTED.unpack(payload)[0])
        if kind == READY:
            if len(payload) != _READY.size:
                raise ProtocolError(f"a READY frame of {len(payload)} bytes, not {_READY.size}")
            return Ready(_READY.unpack(payload)[0])
        if payload:
            raise ProtocolError(f"a BYE frame with {len(payload)} payload bytes")
        return Bye()

    def _settings(self, payload: bytes | bytearray) -> WorkerSettings | TemplateSettings:
        """The settings a CONFIG frame holds, of the type this end expects."""
        expected = _SETTINGS[self.our_role]
        try:
            settings: WorkerSettings | TemplateSettings = pickle.loads(payload)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a malformed frame
            why = f"{type(exc).__name__}: {exc}"
            raise ProtocolError(f"a CONFIG frame whose settings do not unpickle ({why})") from None
        if type(settings) is not expected:
            raise ProtocolError(f"a CONFIG frame holds a {type(settings).__name__}, not {expected.__name__}")
        return settings


# The frame kind of each event a Connection sends.
_KINDS: dict[type, Kind] = {
    Config: CONFIG,
    Ready: READY,
    Area: AREA,
    Job: JOB,
    Value: VALUE,
    Error: ERROR,
    InitFailed: INIT_FAILED,
    Started: STARTED,
    Bye: BYE,
}
