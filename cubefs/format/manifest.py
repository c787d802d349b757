"""Named manifests: ``NAME:TAG`` → image digest, the only mutable objects in a store.

A manifest is small JSON so that a person can read it with ``aws s3 cp``.
Names follow OCI repository rules (lowercase, ``/``-separated components);
the object key quotes the name so that ``a/b:c`` and ``a:b`` never collide.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from cubefs.errors import CorruptDataError, FormatVersionError, UsageError

MAGIC = "cubefs-manifest"
VERSION = 1

_NAME = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME[:TAG]`` → (name, tag); the tag defaults to ``latest``."""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        name, tag = ref, "latest"
    if not _NAME.match(name) or len(name) > 255:
        raise UsageError(
            f"invalid image name {name!r}: use lowercase letters, digits and . _ - separated by /"
        )
    if not _TAG.match(tag):
        raise UsageError(f"invalid tag {tag!r}: use letters, digits, . _ - (at most 128)")
    return name, tag


def manifest_key(name: str, tag: str) -> str:
    return f"manifests/{quote(name, safe='')}/{tag}"


def ref_from_key(key: str) -> str:
    _, qname, tag = key.split("/", 2)
    return f"{unquote(qname)}:{tag}"


@dataclass
class Manifest:
    name: str
    tag: str
    image: str  # hex sha256 of the image metadata
    created: str
    stats: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # a converted image's runtime config
    source: dict[str, Any] = field(default_factory=dict)  # a converted image's origin: its layers

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    def encode(self) -> bytes:
        doc = {
            "magic": MAGIC,
            "version": VERSION,
            "name": self.name,
            "tag": self.tag,
            "image": f"sha256:{self.image}",
            "created": self.created,
            "stats": self.stats,
        }
        if self.config:
            doc["config"] = self.config
        if self.source:
            doc["source"] = self.source
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, ref: str) -> Manifest:
        what = f"manifest {ref}"
        try:
            doc = json.loads(data)
        except ValueError:
            raise CorruptDataError(f"{what}: not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
            raise CorruptDataError(f"{what}: not a cubefs manifest")
        if doc.get("version") != VERSION:
            raise FormatVersionError(
                f"{what}: format version {doc.get('version')!r} is not supported "
                f"(this cubefs reads version {VERSION}); upgrade cubefs"
            )
        image = str(doc.get("image", ""))
        if not re.match(r"^sha256:[0-9a-f]{64}$", image):
            raise CorruptDataError(f"{what}: bad image digest {image!r}")
        config = doc.get("config") or {}
        if not isinstance(config, dict):
            raise CorruptDataError(f"{what}: 'config' is not an object")
        source = doc.get("source") or {}
        if not isinstance(source, dict):
            raise CorruptDataError(f"{what}: 'source' is not an object")
        return cls(doc["name"], doc["tag"], image[7:], doc.get("created", ""), doc.get("stats", {}), config, source)
