"""What happens to a sandbox when its timeout passes, as its creator asked (E2B's lifecycle).

E2B's create takes ``autoPause`` (the SDK's ``lifecycle={"on_timeout": "pause"}``): at the
timeout the sandbox is paused rather than killed, and kept until it is resumed or killed;
``autoResume: {"enabled": true}`` (``"auto_resume": True``) resumes a paused one when traffic
for it reaches the proxy (an SDK call to its envd with the sandbox's access token, a request
to one of its ports that the proxy would let through), with the timeout it was created with.
Only a pause at the timeout is undone by traffic: one asked for through the API stays until
``connect``.  ``autoPauseMemory: false`` (``"mode": "filesystem"``) asks E2B for
a pause that keeps only the disk; here a pause always keeps memory and disk in place (the VM is
stopped where it is), which loses less than was asked, so it is accepted and the sandbox
resumes with its processes.  Before this existed the service ignored ``autoPause``: a sandbox
its user asked to keep was killed at its timeout, with its files.

The choice lives in the sandbox's record (it survives a restart of the service) and a fork's
children inherit it; ``GET /sandboxes/{id}`` shows it as E2B's ``lifecycle``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cubefs.errors import UsageError


@dataclass
class Lifecycle:
    on_timeout: str = "kill"  # or "pause"
    auto_resume: bool = False

    @classmethod
    def from_api(cls, doc: dict[str, Any]) -> Lifecycle:
        """From a create's body; UsageError (400) naming the bad field."""
        pause = doc.get("autoPause")
        if pause is None:
            pause = False
        memory = doc.get("autoPauseMemory")
        resume = doc.get("autoResume")
        if not isinstance(pause, bool):
            raise UsageError("autoPause must be true or false")
        if memory is not None and not isinstance(memory, bool):
            raise UsageError("autoPauseMemory must be true or false")
        if resume is None:
            enabled = False
        elif isinstance(resume, dict) and isinstance(resume.get("enabled"), bool):
            enabled = resume["enabled"]
        else:
            raise UsageError('autoResume must be {"enabled": true or false}')
        if enabled and not pause:
            raise UsageError("autoResume needs autoPause: only a sandbox paused at its timeout is resumed by traffic")
        if enabled and memory is False:
            raise UsageError("autoResume cannot be combined with autoPauseMemory false (E2B: a filesystem-only "
                             "pause is resumed explicitly)")
        return cls("pause" if pause else "kill", enabled)

    @classmethod
    def of(cls, record: Any) -> Lifecycle:
        return cls(record.on_timeout, record.auto_resume)

    def apply(self, record: Any) -> bool:
        """Set it on a sandbox's record; True if that changed it (the record is to be saved).
        The timeout a traffic-resumed sandbox gets is the one it was given now."""
        ttl = max(1, round(record.end - record.started)) if self.auto_resume else 0
        new = (self.on_timeout, self.auto_resume, ttl)
        if (record.on_timeout, record.auto_resume, record.ttl) == new:
            return False
        record.on_timeout, record.auto_resume, record.ttl = new
        return True


def api_fields(record: Any) -> dict[str, Any]:
    """``SandboxDetail.lifecycle``."""
    return {"lifecycle": {"onTimeout": record.on_timeout, "autoResume": record.auto_resume}}
