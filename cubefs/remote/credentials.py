"""Credentials the AWS way, resolved once and refreshed before they expire.

Why two paths: the cheap sources (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
or a profile holding plain keys in ``~/.aws/credentials`` or ``~/.aws/config``)
are read here with the standard library, so a command that has them never
imports botocore (importing ``botocore.session`` costs ~0.2 s, measured in
docs/design.md "Credentials").  Everything else — a web identity token file
(EKS/IRSA), assume-role chains (``source_profile``/``role_arn``),
``credential_process``, SSO, container credentials (``AWS_CONTAINER_CREDENTIALS_*``)
and instance metadata (IMDSv2) — goes to botocore's own resolver, the
reference implementation, in the SDKs' order.  The cheap path answers only
when botocore would give the very same keys: a profile that names a role, a
process or SSO, or a web identity in the environment, sends resolution to
botocore even if plain keys are there too.

Refreshing: temporary credentials are fetched again (in a worker thread,
never on the event loop) when less than half their life or 15 minutes is
left, whichever is less, while requests go on signing with the current ones;
only inside the last quarter (or 10 minutes) does a request wait for the
fetch.  So a daemon that runs for weeks never signs with an expired key, and
a refresh that fails early is retried while the old key still works.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cubefs.errors import StoreError

if TYPE_CHECKING:
    import configparser

log = logging.getLogger(__name__)

# Keys of a profile that make botocore's chain, not plain keys, decide.
_CHAIN_KEYS = ("role_arn", "source_profile", "credential_source", "credential_process", "web_identity_token_file",
               "sso_session", "sso_start_url", "sso_account_id", "login_session")
# Environment that puts a provider before (or instead of) the shared files.
_CHAIN_ENV = ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
              "AWS_CONTAINER_CREDENTIALS_FULL_URI")
RETRY_FAILED_REFRESH = 5.0  # seconds between refresh attempts while the old key still works


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None
    expires: float | None = None  # wall-clock seconds; None: never
    source: str = "static"


def _profile_name() -> str:
    return os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"


def _read(path: str) -> configparser.RawConfigParser | None:
    import configparser  # only when a shared file exists: most nodes have env keys or none

    parser = configparser.RawConfigParser()
    try:
        parser.read(path)
    except (configparser.Error, UnicodeDecodeError):
        return None  # botocore reports a broken file in its own words
    return parser


def config_profile(profile: str | None = None) -> dict[str, str]:
    """The profile's section of the shared config file (``[default]`` or ``[profile NAME]``)."""
    profile = profile or _profile_name()
    path = os.path.expanduser(os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config")
    parser = _read(path) if os.path.exists(path) else None
    if parser is None:
        return {}
    for section in (f"profile {profile}", profile if profile == "default" else ""):
        if section and parser.has_section(section):
            return dict(parser[section])
    return {}


def cheap_credentials() -> Credentials | None:
    """The keys botocore would find first, if they are plain keys; else None (ask botocore)."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return Credentials(key, secret, os.environ.get("AWS_SESSION_TOKEN") or None, source="env")
    if key or secret or any(os.environ.get(name) for name in _CHAIN_ENV):
        return None
    profile = _profile_name()
    conf = config_profile(profile)
    if any(k in conf for k in _CHAIN_KEYS):
        return None
    path = os.path.expanduser(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials")
    parser = _read(path) if os.path.exists(path) else None
    if parser is not None and parser.has_section(profile):
        sec = dict(parser[profile])
        if any(k in sec for k in _CHAIN_KEYS):
            return None
        if sec.get("aws_access_key_id") and sec.get("aws_secret_access_key"):
            return Credentials(sec["aws_access_key_id"], sec["aws_secret_access_key"],
                               sec.get("aws_session_token") or None, source="shared-credentials-file")
    if conf.get("aws_access_key_id") and conf.get("aws_secret_access_key"):
        return Credentials(conf["aws_access_key_id"], conf["aws_secret_access_key"],
                           conf.get("aws_session_token") or None, source="config-file")
    return None


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return float(value.timestamp())


def credential_error(err: Exception) -> StoreError:
    """botocore's exceptions in one line that says where to look."""
    name = type(err).__name__
    text = " ".join(str(err).split())
    response = getattr(err, "response", None)
    if isinstance(response, dict) and response.get("Error"):  # a service's answer (STS, SSO)
        e = response["Error"]
        name = f"{getattr(err, 'operation_name', 'call')} refused, {e.get('Code', '')}"
        text = " ".join(str(e.get("Message", "")).split())
    hint = {
        "ProfileNotFound": "set AWS_PROFILE to a profile of ~/.aws/config",
        "PartialCredentialsError": "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        "InvalidConfigError": "fix that profile in ~/.aws/config",
        "CredentialRetrievalError": "check the provider the profile or environment names",
        "UnauthorizedSSOTokenError": "run 'aws sso login'",
        "SSOTokenLoadError": "run 'aws sso login'",
    }.get(name, "check the profile (AWS_PROFILE) and the AWS_* environment")
    return StoreError(f"cannot get AWS credentials ({name}: {text}): {hint}")


class _Chain:
    """botocore's resolver, imported here and only here."""

    def __init__(self, profile: str | None) -> None:
        import botocore.exceptions
        import botocore.session

        if not log.isEnabledFor(logging.DEBUG):  # its tracebacks: we report the failure in one line
            logging.getLogger("botocore.credentials").setLevel(logging.ERROR)
        self._errors: tuple[type[Exception], ...] = (botocore.exceptions.BotoCoreError,
                                                     botocore.exceptions.ClientError)
        try:
            session = botocore.session.Session(profile=profile)
            self.creds = session.get_credentials()
        except self._errors as err:
            raise credential_error(err) from None
        self.region: str | None = session.get_config_variable("region") if self.creds is not None else None

    def fetch(self, first: bool) -> Credentials | None:
        c = self.creds
        if c is None:
            return None
        method = getattr(c, "method", "botocore")
        refresh: Callable[[], dict[str, Any]] | None = getattr(c, "_refresh_using", None)
        try:
            if first or refresh is None:
                frozen = c.get_frozen_credentials()
                return Credentials(frozen.access_key, frozen.secret_key, frozen.token,
                                   _epoch(getattr(c, "_expiry_time", None)), method)
            data = refresh()  # the provider's own fetch, exactly once: we decide when
        except self._errors as err:
            raise credential_error(err) from None
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise StoreError(f"cannot refresh AWS credentials from {method}: {err}") from None
        return Credentials(data["access_key"], data["secret_key"], data.get("token"),
                           _epoch(data.get("expiry_time")), method)


class CredentialSource:
    """What signs a store's requests: resolved on first use, refreshed ahead of expiry.

    Runs on the store's asyncio loop; fetches happen in a worker thread and at most
    one at a time (single-flight)."""

    def __init__(self) -> None:
        self.current: Credentials | None = None
        self.region: str | None = None  # a profile's region, when botocore resolved it
        self.refreshes = 0
        self._resolved = False
        self._chain: _Chain | None = None
        self._task: asyncio.Task[None] | None = None
        self._next_try = 0.0
        self._soft = self._hard = 0.0

    @property
    def source(self) -> str:
        if not self._resolved:
            return "unresolved"
        return self.current.source if self.current is not None else "none (unsigned requests)"

    def describe(self) -> dict[str, Any]:
        c = self.current
        return {"source": self.source, "access_key": c.access_key if c else None,
                "expires": c.expires if c else None, "refreshes": self.refreshes}

    def resolve_cheap(self) -> bool:
        """Take env/static keys without botocore; False if botocore must decide."""
        creds = cheap_credentials()
        if creds is not None:
            self._set(creds)
            self._resolved = True
        return creds is not None

    def _resolve_chain(self) -> Credentials | None:
        # botocore reads AWS_PROFILE itself; naming the profile here would make it skip env keys
        self._chain = _Chain(None)
        self.region = self._chain.region
        return self._chain.fetch(first=True)

    def _set(self, creds: Credentials | None) -> None:
        self.current = creds
        if creds is not None and creds.expires is not None:
            life = max(0.0, creds.expires - time.time())
            self._soft = creds.expires - min(900.0, life / 2)
            self._hard = creds.expires - min(600.0, life / 4)

    async def get(self) -> Credentials | None:
        """The credentials to sign with now (None: unsigned).  Costs nothing unless a fetch is due."""
        if not self._resolved:
            await asyncio.shield(self._start(first=True))
        c = self.current
        if c is None or c.expires is None:
            return c
        now = time.time()
        if now < self._soft:
            return c
        if self._task is None and (now >= self._hard or now >= self._next_try):
            self._start(first=False)
        if now >= self._hard and self._task is not None:
            await asyncio.shield(self._task)
        return self.current

    async def invalidate(self) -> bool:
        """The store said the token expired: fetch again now; False if these keys cannot be renewed."""
        if self._chain is None or self.current is None:
            return False
        self._soft = self._hard = 0.0
        self._next_try = 0.0
        await self.get()
        return True

    def _start(self, first: bool) -> asyncio.Task[None]:
        """One fetch at a time; every caller that needs it awaits the same task."""
        if self._task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(first))
            task.add_done_callback(self._done)
            self._task = task
        return self._task

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled():
            task.exception()  # a background refresh's failure is logged in _fetch, raised to waiters

    async def _fetch(self, first: bool) -> None:
        if first:
            if self.resolve_cheap():
                return
            creds = await asyncio.to_thread(self._resolve_chain)
            self._set(creds)
            self._resolved = True
            log.info("AWS credentials from %s%s", self.source, _expiry_text(creds))
            return
        assert self._chain is not None
        try:
            creds = await asyncio.to_thread(self._chain.fetch, False)
        except StoreError as err:
            old = self.current
            if old is None or old.expires is None or time.time() >= old.expires - 30:
                raise
            self._next_try = time.time() + RETRY_FAILED_REFRESH
            log.warning("refreshing AWS credentials failed; the current ones work until %s: %s",
                        _when(old.expires), err)
            return
        self.refreshes += 1
        self._set(creds)
        log.info("AWS credentials refreshed from %s%s", self.source, _expiry_text(creds))


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _expiry_text(creds: Credentials | None) -> str:
    return f" (expire {_when(creds.expires)})" if creds is not None and creds.expires is not None else ""
