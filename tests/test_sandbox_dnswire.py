"""The sandbox resolver's DNS codec (sandbox/network/dnswire.py) against messages another
implementation (dnslib) made: what it reads from a query and a response, and what it sends."""

from __future__ import annotations

import struct

import pytest
from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSRecord

from sandbox.network import dnswire as dw


def test_a_query_read_as_asked() -> None:
    q = DNSRecord.question("WWW.Example.Test", "A")
    got = dw.parse_query(q.pack())
    assert (got.id, got.name, got.qtype, got.udp_size) == (q.header.id, "www.example.test", dw.A, 512)
    q.add_ar(EDNS0(udp_len=1232))
    assert dw.parse_query(q.pack()).udp_size == 1232
    for bad in (b"", b"\0" * 11, DNSRecord.question("a.test").reply().pack()):  # short, short, a response
        with pytest.raises(dw.DnsError):
            dw.parse_query(bad)


def test_a_response_read_through_compression_cname_and_soa() -> None:
    q = DNSRecord.question("www.good.test", "A")
    r = q.reply()
    r.add_answer(RR("www.good.test", QTYPE.CNAME, rdata=CNAME("cdn.good.test"), ttl=300))
    r.add_answer(RR("cdn.good.test", QTYPE.A, rdata=A("198.18.6.6"), ttl=40))
    r.add_answer(RR("cdn.good.test", QTYPE.A, rdata=A("198.18.6.7"), ttl=50))
    r.add_answer(RR("cdn.good.test", QTYPE.AAAA, rdata=AAAA("2001:db8::1"), ttl=50))
    msg = r.pack()
    got = dw.parse_response(msg)
    assert got.rcode == dw.NOERROR and got.addresses == ["198.18.6.6", "198.18.6.7"] and got.min_answer_ttl == 40
    assert [struct.unpack_from("!I", msg, o)[0] for o in got.ttl_offsets] == [300, 40, 50, 50]
    n = q.reply()
    n.header.rcode = RCODE.NXDOMAIN
    n.add_auth(RR("good.test", QTYPE.SOA, rdata=SOA("ns.good.test", "h.good.test", (1, 2, 3, 4, 30)), ttl=600))
    got = dw.parse_response(n.pack())
    assert got.rcode == dw.NXDOMAIN and got.addresses == [] and got.negative_ttl == 30


def test_answers_for_the_client() -> None:
    q = DNSRecord.question("Good.Test", "A")
    query = dw.parse_query(q.pack())
    r = DNSRecord.question("good.test", "A").reply()  # another id, another spelling
    r.add_answer(RR("good.test", QTYPE.A, rdata=A("198.18.6.6"), ttl=30))
    msg = r.pack()
    out = DNSRecord.parse(dw.for_client(msg, query, dw.parse_response(msg).ttl_offsets, age=12))
    assert out.header.id == q.header.id and str(out.q.qname) == "Good.Test." and out.rr[0].ttl == 18
    assert str(out.rr[0].rdata) == "198.18.6.6"
    refused = DNSRecord.parse(dw.reply(query, dw.REFUSED))
    assert refused.header.rcode == RCODE.REFUSED and refused.header.id == q.header.id and not refused.rr
    cut = DNSRecord.parse(dw.truncated(msg, query))
    assert cut.header.tc == 1 and not cut.rr and str(cut.q.qname) == "Good.Test."
