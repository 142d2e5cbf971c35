"""A member caller for the ensemble tests: the real in-process SavedModel calls, recorded, with optional
delays and errors in front of them."""

from __future__ import annotations

import threading
import time

from carclf.ensemble.members import SavedModelMemberCaller


class RecordingCaller(SavedModelMemberCaller):
    """Records every call; optionally sleeps or fails first for some members."""

    _shared_models: dict = {}  # loaded SavedModels, shared by every test that uses a RecordingCaller (read-only)

    def __init__(self, repository, *, delays=None, failures=None):
        super().__init__(repository)
        self._loaded = self._shared_models.setdefault(str(repository), {})
        self.delays = dict(delays or {})
        self.failures = dict(failures or {})  # member -> list of errors to raise before answering
        self.calls: list[tuple[str, tuple[int, ...], float]] = []
        self.lock = threading.Lock()

    def close(self):
        pass  # the loaded models are shared with the other tests

    def call(self, member, pixels, *, deadline, cancel=None):
        with self.lock:
            self.calls.append((member.name, pixels.shape, time.monotonic()))
            pending = self.failures.get(member.name)
            error = pending.pop(0) if pending else None
        if error is not None:
            raise error
        time.sleep(self.delays.get(member.name, 0.0))
        return super().call(member, pixels, deadline=deadline, cancel=cancel)
