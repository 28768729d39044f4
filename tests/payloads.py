"""Hostile inputs for security tests (weights_only loading)."""

import os


class SystemCallPayload:
    """Pickles as a call to `os.system("touch <marker>")`: what a malicious checkpoint runs on a plain
    `pickle.load`. A test passes when loading refuses it and `marker` does not exist afterwards."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
