"""Pulling an image from a registry over the OCI distribution API (v2).

``HOST[:PORT]/REPO[:TAG|@sha256:...]``: the manifest (an index is resolved to
the wanted platform), the config, then each layer as a stream straight into
the build, never whole in memory.  Authentication is the registry token
flow: a 401 names a realm, which gives a bearer token for the repository
(anonymously, or with ``$CUBEFS_REGISTRY_USER`` / ``$CUBEFS_REGISTRY_PASSWORD``).
``insecure`` speaks plain HTTP, for a local registry.  Everything fetched by
digest is checked against it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any

from cubefs.dedup.oci import INDEX_TYPES, MANIFEST_TYPES, Layer, OciImage, pick_platform
from cubefs.errors import BadInputError, NotFoundError, StoreUnavailableError, UsageError

TIMEOUT = 60.0
_REF = re.compile(r"^(?P<host>[^/]+)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
                  r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127})|@(?P<digest>sha256:[0-9a-f]{64}))?$")


class Registry:
    def __init__(self, host: str, repo: str, insecure: bool) -> None:
        self.base = f"{'http' if insecure else 'https'}://{host}/v2/{repo}"
        self.repo = repo
        self.where = f"docker://{host}/{repo}"
        self.token: str | None = None

    def _open(self, url: str, accept: tuple[str, ...] = ()) -> IO[bytes]:
        for attempt in range(2):
            req = urllib.request.Request(url, headers={"Accept": ", ".join(accept)} if accept else {})
            if self.token:
                req.add_header("Authorization", f"Bearer {self.token}")
            try:
                return urllib.request.urlopen(req, timeout=TIMEOUT)  # type: ignore[no-any-return]
            except urllib.error.HTTPError as err:
                if err.code == 401 and attempt == 0 and self.token is None:
                    self.token = self._token(err.headers.get("WWW-Authenticate", ""))
                    continue
                if err.code == 404:
                    raise NotFoundError(f"{self.where}: {url.rsplit('/', 2)[-2:][-1]} not found") from None
                raise StoreUnavailableError(f"{self.where}: HTTP {err.code} for {url}") from None
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise StoreUnavailableError(f"{self.where}: registry unreachable ({reason})") from None
        raise StoreUnavailableError(f"{self.where}: the registry refused our token")

    def _token(self, challenge: str) -> str:
        if not challenge.lower().startswith("bearer "):
            raise StoreUnavailableError(f"{self.where}: unsupported authentication {challenge[:60]!r}")
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        query.setdefault("scope", f"repository:{self.repo}:pull")
        req = urllib.request.Request(f"{params.get('realm', '')}?{urllib.parse.urlencode(query)}")
        user, password = os.environ.get("CUBEFS_REGISTRY_USER"), os.environ.get("CUBEFS_REGISTRY_PASSWORD")
        if user:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as res:
                doc = json.loads(res.read())
        except (urllib.error.URLError, OSError, ValueError) as err:
            realm = params.get("realm")
            raise StoreUnavailableError(f"{self.where}: cannot get a token from {realm} ({err})") from None
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise StoreUnavailableError(f"{self.where}: the token service gave no token")
        return str(token)

    def manifest(self, reference: str) -> tuple[dict[str, Any], str]:
        with self._open(f"{self.base}/manifests/{reference}", INDEX_TYPES + MANIFEST_TYPES) as res:
            data = res.read(16 << 20)
            media = res.headers.get("Content-Type", "").split(";")[0]
        if reference.startswith("sha256:") and f"sha256:{hashlib.sha256(data).hexdigest()}" != reference:
            raise BadInputError(f"{self.where}: manifest {reference[:19]} does not match its digest")
        try:
            doc = json.loads(data)
        except ValueError:
            raise BadInputError(f"{self.where}: manifest {reference} is not JSON") from None
        return doc, doc.get("mediaType") or media

    def blob(self, digest: str) -> IO[bytes]:
        return self._open(f"{self.base}/blobs/{digest}")


def open_registry_image(spec: str, wanted_platform: str | None, insecure: bool) -> OciImage:
    m = _REF.match(spec)
    if not m:
        raise UsageError(f"docker://{spec}: expected docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]")
    reg = Registry(m["host"], m["repo"], insecure)
    reference = m["digest"] or m["tag"] or "latest"
    doc, media = reg.manifest(reference)
    while media in INDEX_TYPES or "manifests" in doc:
        desc = pick_platform(doc, wanted_platform, f"{reg.where}:{reference}")
        doc, media = reg.manifest(desc["digest"])
    if "config" not in doc or "layers" not in doc:
        raise BadInputError(f"{reg.where}:{reference}: unsupported manifest ({media or 'no media type'})")
    cdigest = doc["config"]["digest"]
    with reg.blob(cdigest) as res:
        raw = res.read(64 << 20)
    if f"sha256:{hashlib.sha256(raw).hexdigest()}" != cdigest:
        raise BadInputError(f"{reg.where}: config {cdigest[:19]} does not match its digest")
    try:
        config = json.loads(raw)
    except ValueError:
        raise BadInputError(f"{reg.where}: config is not JSON") from None
    layers = [Layer(layer["digest"], int(layer.get("size", 0)), lambda d=layer["digest"]: reg.blob(d))  # type: ignore[misc]
              for layer in doc["layers"]]
    return OciImage(f"{reg.where}:{reference}", config, layers)
