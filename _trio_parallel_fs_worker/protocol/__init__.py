"""The wire protocol between the parent, its workers and the template, without any I/O.

Split by concern, as h11 is: `events` (what travels, typed), `framing` (frames
and their payload layouts, the one framer), `connection` (each end's state
machine: every frame goes through its ``send``), `control` (the template's
fixed records after its handshake) and `descriptor` (where a message's
buffers lie in a shared memory area: a plain record the protocol carries and
``_shm`` interprets; the protocol imports no transport).

This face gathers the names both ends use, so that a hot path reads
``p.Value`` (one module attribute) rather than reaching into the rooms.
"""

from .connection import PARENT as PARENT
from .connection import TEMPLATE as TEMPLATE
from .connection import WORKER as WORKER
from .connection import Connection as Connection
from .control import CEILING as CEILING
from .control import CONTROL_RECORD as CONTROL_RECORD
from .control import EXITED as EXITED
from .control import FORK as FORK
from .control import FORK_AHEAD as FORK_AHEAD
from .control import FORK_FAILED as FORK_FAILED
from .control import KILL as KILL
from .control import PID as PID
from .control import STATUS_RECORD as STATUS_RECORD
from .control import parse_records as parse_records
from .events import KEEP as KEEP
from .events import NEED_DATA as NEED_DATA
from .events import Area as Area
from .events import Bye as Bye
from .events import Closed as Closed
from .events import Config as Config
from .events import Error as Error
from .events import Event as Event
from .events import InitFailed as InitFailed
from .events import Job as Job
from .events import ProtocolError as ProtocolError
from .events import Ready as Ready
from .events import Retire as Retire
from .events import Started as Started
from .events import Value as Value
from .framing import AREA as AREA
from .framing import BYE as BYE
from .framing import CONFIG as CONFIG
from .framing import ERROR as ERROR
from .framing import HEADER as HEADER
from .framing import INIT_FAILED as INIT_FAILED
from .framing import JOB as JOB
from .framing import JOB_AREA as JOB_AREA
from .framing import JOB_BUFFERS as JOB_BUFFERS
from .framing import LARGE_PAYLOAD as LARGE_PAYLOAD
from .framing import READY as READY
from .framing import RECV_SIZE as RECV_SIZE
from .framing import STARTED as STARTED
from .framing import VALUE as VALUE
from .framing import VALUE_AREA as VALUE_AREA
from .framing import VALUE_BUFFERS as VALUE_BUFFERS
from .framing import Kind as Kind
