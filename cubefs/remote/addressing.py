"""Where a bucket's requests go: virtual-hosted or path style, and the signing region.

AWS and Tencent COS expect ``BUCKET.s3.REGION.amazonaws.com`` /
``BUCKET.cos.REGION.myqcloud.com`` (AWS stopped path style for new buckets;
COS's S3 API answers path-style requests for some operations only), while
servers on an IP or a single-label host (SeaweedFS, MinIO, Ceph on a LAN)
usually know only path style.  ``auto`` picks virtual-hosted for the cloud
names and path style for the rest; ``--s3-addressing`` or
``AWS_S3_ADDRESSING_STYLE`` say otherwise.  A bucket whose name is not a
valid DNS label, or has dots under https (the wildcard certificate would not
match), is addressed path style, as botocore does.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from urllib.parse import urlparse

from cubefs.errors import UsageError

STYLES = ("auto", "virtual", "path")
ENV = "AWS_S3_ADDRESSING_STYLE"
_VIRTUAL_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn", ".myqcloud.com")
_DNS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# s3.REGION.amazonaws.com, s3-REGION.amazonaws.com, s3.dualstack.REGION..., cos.REGION.myqcloud.com
_REGION_IN_HOST = re.compile(
    r"(?:^|\.)(?:s3[.-](?:dualstack\.|fips\.)?(?P<aws>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?"
    r"|cos\.(?P<cos>[a-z0-9-]+)\.myqcloud\.com)$"
)


def style_setting(given: str | None = None) -> str:
    style = (given or os.environ.get(ENV) or "auto").strip().lower()
    if style not in STYLES:
        raise UsageError(f"S3 addressing style {style!r} is not one of {', '.join(STYLES)} "
                         f"(--s3-addressing or ${ENV})")
    return style


def _is_ip_or_local(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host == "localhost" or host.endswith(".localhost") or "." not in host


def region_from_host(host: str) -> str | None:
    """``s3.eu-west-1.amazonaws.com`` → eu-west-1; ``cos.ap-guangzhou.myqcloud.com`` → ap-guangzhou."""
    m = _REGION_IN_HOST.search(host.lower())
    if not m:
        return None
    region = m.group("aws") or m.group("cos")
    return None if region in ("amazonaws", "external-1") else region


@dataclass(frozen=True)
class Addressing:
    """The endpoint to connect to and the path prefix of every request for one bucket."""

    endpoint: str  # scheme://host[:port][/base]: the bucket's host when virtual
    bucket_path: str  # "/BUCKET" for path style, "" for virtual
    virtual: bool


def choose(endpoint: str, bucket: str, style: str) -> Addressing:
    u = urlparse(endpoint)
    host = (u.hostname or "").lower()
    dns_ok = bool(_DNS_BUCKET.match(bucket)) and ".." not in bucket and not (u.scheme == "https" and "." in bucket)
    if style == "auto":
        virtual = dns_ok and not _is_ip_or_local(host) and host.endswith(_VIRTUAL_SUFFIXES)
    elif style == "virtual":
        if not dns_ok:
            raise UsageError(f"bucket {bucket!r} cannot be addressed virtual-hosted style (not a DNS name, or dots "
                             "under https): use --s3-addressing path")
        if _is_ip_or_local(host) and host != "localhost" and not host.endswith(".localhost"):
            raise UsageError(f"endpoint {endpoint!r} is an IP address or a single-label host: virtual-hosted "
                             "addressing needs a DNS name (use --s3-addressing path)")
        virtual = True
    else:
        virtual = False
    if not virtual:
        return Addressing(endpoint.rstrip("/"), f"/{bucket}", False)
    netloc = f"{bucket}.{u.netloc}"
    return Addressing(f"{u.scheme}://{netloc}{u.path.rstrip('/')}", "", True)
