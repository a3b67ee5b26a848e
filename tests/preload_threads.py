"""A module that starts a thread when imported, as OpenBLAS does uncapped."""

import threading
import time

threading.Thread(target=time.sleep, args=(60,), daemon=True, name="starts-at-import").start()
