"""Regression tests for l7/http1.py: one named case per rule of docs/http.md.

Every table case runs fed whole, one byte at a time and cut at every offset (so each case also
proves split-invariance of both the result and the error). Accepted requests are checked against
h11 as a differential oracle unless the case documents a deliberate difference.
"""

from __future__ import annotations

import sys

import fuzz_http1
import h11
import pytest
from cores import CORES, use_core
from fuzz_http1 import (
    bytewise,
    check_corpus_file,
    corpus_files,
    drive,
    request_fields,
    split_at,
    # Collected here: pytest only collects test_*.py files.
    test_fuzz_request_invariant,  # noqa: F401
    test_fuzz_response_invariant,  # noqa: F401
    whole,
)
from l7.http1 import (
    LAST_CHUNK,
    NEED_DATA,
    PAUSED,
    EndOfMessage,
    HTTPError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    chunk,
    serialize_request_head,
    serialize_response_head,
    serialize_trailers,
)
from l7.h1writer import request_head_bytes, response_head_bytes

H = b"Host: a.example"


@pytest.fixture(autouse=True, params=CORES)
def core(request, monkeypatch):
    """Every table, corpus file and fuzz run here runs against both cores (tests/cores.py)."""
    use_core(monkeypatch, request.param, sys.modules[__name__], fuzz_http1)
    return request.param


def req(*lines: bytes, body: bytes = b"", start: bytes = b"POST / HTTP/1.1") -> bytes:
    return start + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


CHUNKED = b"Transfer-Encoding: chunked"


def chunked_req(body: bytes, *extra: bytes) -> bytes:
    return req(b"Host: a", CHUNKED, *extra, body=body)


def all_feedings(data: bytes):
    """whole, byte-by-byte and every single cut (a sample of cuts for long inputs)."""
    yield "whole", whole(data)
    yield "bytewise", bytewise(data)
    step = 1 if len(data) <= 300 else len(data) // 150
    for i in range(1, len(data), step):
        yield f"cut@{i}", split_at(data, i)


def outcome_everywhere(data: bytes, **kw):
    """The outcome, asserted identical for every way of feeding ``data``."""
    reference = None
    for name, pieces in all_feedings(data):
        got = drive(pieces, **kw)
        if reference is None:
            reference = got
        else:
            assert got == reference, f"{name}: {got} != whole: {reference}"
    return reference


# ============================================================================================
# Requests that must be refused: (id, raw bytes, status). Grouped by rule; docs/http.md has the
# RFC section for each group.

REQUEST_ERRORS = [
    # --- CL + TE, RFC 9112 §6.1 / §6.3 rule 3: refused (CL.TE and TE.CL desync)
    ("cl_te", req(b"Host: a", b"Content-Length: 6", CHUNKED, body=b"0\r\n\r\nG"), 400),
    ("te_cl", req(b"Host: a", CHUNKED, b"Content-Length: 4", body=b"5c\r\nGPOST / HTTP/1.1\r\n"), 400),
    ("cl_te_zero_cl", req(b"Host: a", b"Content-Length: 0", CHUNKED, body=b"0\r\n\r\n"), 400),
    ("cl_te_obfuscated_te", req(b"Host: a", b"Content-Length: 4", CHUNKED,
                                b"Transfer-Encoding: x"), 400),
    ("cl_te_comma_chunked", req(b"Host: a", b"Transfer-Encoding: ,chunked",
                                b"Content-Length: 5", body=b"0\r\n\r\n"), 400),
    # --- Transfer-Encoding, RFC 9112 §6.1, §6.3 rule 4, §7
    ("te_final_not_chunked", req(b"Host: a", b"Transfer-Encoding: chunked, identity"), 400),
    ("te_identity", req(b"Host: a", b"Transfer-Encoding: identity"), 400),
    ("te_gzip_only", req(b"Host: a", b"Transfer-Encoding: gzip"), 400),
    ("te_unknown_before_chunked", req(b"Host: a", b"Transfer-Encoding: gzip, chunked"), 501),
    ("te_unknown_field_then_chunked", req(b"Host: a", b"Transfer-Encoding: cow", CHUNKED), 501),
    ("te_chunked_twice_list", req(b"Host: a", b"Transfer-Encoding: chunked, chunked"), 400),
    ("te_chunked_twice_fields", req(b"Host: a", CHUNKED, CHUNKED, body=b"0\r\n\r\n"), 400),
    ("te_chunked_then_unknown_field", req(b"Host: a", CHUNKED, b"Transfer-Encoding: x"), 400),
    ("te_in_http10", req(CHUNKED, start=b"POST / HTTP/1.0", body=b"0\r\n\r\n"), 400),
    ("te_xchunked", req(b"Host: a", b"Transfer-Encoding: xchunked"), 400),
    ("te_chunked1", req(b"Host: a", b"Transfer-Encoding: chunked1"), 400),
    ("te_lazy_chunk", req(b"Host: a", b"Transfer-Encoding: chunk"), 400),
    ("te_quoted", req(b"Host: a", b'Transfer-Encoding: "chunked"'), 400),
    ("te_apostrophes", req(b"Host: a", b"Transfer-Encoding: 'chunked'"), 400),
    ("te_nested", req(b"Host: a", b"Transfer-Encoding: cow chunked bar"), 400),
    ("te_with_parameter", req(b"Host: a", b"Transfer-Encoding: chunked;q=1"), 400),
    ("te_empty", req(b"Host: a", b"Transfer-Encoding: "), 400),
    ("te_only_commas", req(b"Host: a", b"Transfer-Encoding: , ,"), 400),
    ("te_vertical_tab", req(b"Host: a", b"Transfer-Encoding:\x0bchunked"), 400),
    ("te_form_feed", req(b"Host: a", b"Transfer-Encoding: \x0cchunked"), 400),
    ("te_obs_text_prefix", req(b"Host: a", b"Transfer-Encoding: \xffchunked"), 400),
    ("te_nbsp_suffix", req(b"Host: a", b"Transfer-Encoding: chunked\xa0"), 400),
    ("te_accented", req(b"Host: a", b"Transfer-Encoding: ch\x96nked"), 400),
    ("te_space_before_colon", req(b"Host: a", b"Transfer-Encoding : chunked"), 400),
    ("te_tab_before_colon", req(b"Host: a", b"Transfer-Encoding\t:\tchunked"), 400),
    ("te_space_in_name", req(b"Host: a", b"Transfer Encoding: chunked"), 400),
    ("te_leading_space_first_field", req(b" Transfer-Encoding: chunked", b"Host: a"), 400),
    ("te_leading_space_later_field", req(b"Host: a", b" Transfer-Encoding: chunked"), 400),
    ("te_obs_fold", req(b"Host: a", b"Transfer-Encoding:", b" chunked"), 400),
    ("te_lf_folded", req(b"Host: a", b"Transfer-Encoding:\n chunked"), 400),
    ("te_after_bare_cr", req(b"Host: a", b"X: X\rTransfer-Encoding: chunked"), 400),
    ("te_after_lone_lf", req(b"Host: a", b"X: X\nTransfer-Encoding: chunked"), 400),
    ("te_cr_in_name", req(b"Host: a", b"Transfer\r-Encoding: chunked"), 400),
    ("te_trailing_cr", req(b"Host: a", b"Transfer-Encoding: chunked\r"), 400),
    ("te_name_split_over_lines", req(b"Host: a", b"Transfer-", b"Encoding: chunked",
                                     b"Content-Length: 5", body=b"0\r\n\r\n"), 400),
    # --- Content-Length, RFC 9110 §8.6, RFC 9112 §6.3 rule 5
    ("cl_plus", req(b"Host: a", b"Content-Length: +5", body=b"hello"), 400),
    ("cl_minus", req(b"Host: a", b"Content-Length: -5"), 400),
    ("cl_hex", req(b"Host: a", b"Content-Length: 0x5", body=b"hello"), 400),
    ("cl_two_numbers", req(b"Host: a", b"Content-Length: 5 5", body=b"hello"), 400),
    ("cl_underscore", req(b"Host: a", b"Content-Length: 1_0", body=b"0123456789"), 400),
    ("cl_decimal_point", req(b"Host: a", b"Content-Length: 5.0", body=b"hello"), 400),
    ("cl_trailing_junk", req(b"Host: a", b"Content-Length: 1Z", body=b"Z"), 400),
    ("cl_empty", req(b"Host: a", b"Content-Length: "), 400),
    ("cl_empty_then_value", req(b"Host: a", b"Content-Length: ", b"Content-Length: 43"), 400),
    ("cl_conflicting_fields", req(b"Host: a", b"Content-Length: 1", b"Content-Length: 0",
                                  body=b"Z"), 400),
    ("cl_conflicting_fields_rev", req(b"Host: a", b"Content-Length: 0", b"Content-Length: 1",
                                      body=b"Z"), 400),
    ("cl_conflicting_list", req(b"Host: a", b"Content-Length: 5, 6", body=b"hello!"), 400),
    ("cl_list_empty_member", req(b"Host: a", b"Content-Length: 5,", body=b"hello"), 400),
    ("cl_20_digits", req(b"Host: a", b"Content-Length: 00000000000000000005"), 400),
    ("cl_over_int64", req(b"Host: a", b"Content-Length: 9223372036854775808"), 400),
    ("cl_unicode_digit", req(b"Host: a", b"Content-Length: \xd9\xa5"), 400),
    ("cl_space_before_colon", req(b"Host: a", b"Content-Length : 34", body=b"x" * 34), 400),
    ("cl_nel_before_colon", req(b"Host: a", b"Content-Length\x85: 10", body=b"0123456789"), 400),
    ("cl_no_colon", req(b"Host: a", b"Content-Length 10", body=b"0123456789"), 400),
    ("cl_connect_with_body", req(b"Host: a:443", b"Content-Length: 5", body=b"hello",
                                 start=b"CONNECT a:443 HTTP/1.1"), 400),
    ("te_connect", req(b"Host: a:443", CHUNKED, start=b"CONNECT a:443 HTTP/1.1"), 400),
    # --- chunked body framing, RFC 9112 §7.1
    ("chunk_size_0x", chunked_req(b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_size_minus", chunked_req(b"-5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_size_minus_0x0", chunked_req(b"-0x0\r\n\r\n"), 400),
    ("chunk_size_plus", chunked_req(b"+5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_size_underscore", chunked_req(b"0_2e\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), 400),
    ("chunk_size_leading_space", chunked_req(b" 5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_size_many_leading_spaces", chunked_req(b"           0\r\n\r\n"), 400),
    ("chunk_size_trailing_space", chunked_req(b"5 \r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_size_trailing_tab", chunked_req(b"5\t\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_size_lone_lf", chunked_req(b"5\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_size_bare_cr", chunked_req(b"5\rhello\r\n0\r\n\r\n"), 400),
    ("chunk_size_cr_cr_ext", chunked_req(b"5\r\r;ABCD\r\n34\r\nE\r\n0\r\n\r\n"), 400),
    ("chunk_size_prefix_garbage", chunked_req(b"1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n"), 400),
    ("chunk_size_17_digits", chunked_req(b"00000000000000005\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_size_huge", chunked_req(b"fffffffffffffffffffff\r\n"), 400),
    ("chunk_size_empty", chunked_req(b"\r\n\r\n"), 400),
    ("chunk_size_not_hex", chunked_req(b"INVALID!!!\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), 400),
    ("chunk_size_z", chunked_req(b"Z\r\nZZ\r\nZZZ\r\n\r\n"), 400),
    ("chunk_ext_nul", chunked_req(b"5;a\x00b\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_ext_bare_cr", chunked_req(b"5;a\rb\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_ext_cr_after_semicolon", chunked_req(b"41;a=b\r\rX\r\n0\r\n\r\n"), 400),
    ("chunk_ext_lone_lf", chunked_req(b"5;a\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_ext_ctl_in_quoted", chunked_req(b'5;a="\x01"\r\nhello\r\n0\r\n\r\n'), 400),
    ("chunk_ext_unterminated_quote", chunked_req(b'5;a="b\r\nhello\r\n0\r\n\r\n'), 400),
    ("chunk_ext_space_in_name", chunked_req(b"5;a b\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_ext_empty_name", chunked_req(b"5;\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_ext_no_name", chunked_req(b"5;=x\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_ext_empty_value", chunked_req(b"5;a=\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_ext_without_semicolon", chunked_req(b"5 a=b\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_ext_too_long", chunked_req(b"5;a=" + b"b" * 5000 + b"\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_ext_total_too_long",
     chunked_req(b"".join(b"1;a=" + b"b" * 4000 + b"\r\nx\r\n" for _ in range(5))), 400),
    ("chunk_data_not_followed_by_crlf", chunked_req(b"5\r\nhelloXX0\r\n\r\n"), 400),
    ("chunk_data_lf_only", chunked_req(b"5\r\nhello\n0\r\n\r\n"), 400),
    ("chunk_data_longer_than_size", chunked_req(b"3\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk_extra_crlf_before_last", chunked_req(b"5\r\nhello\r\n\r\n0\r\n\r\n"), 400),
    ("chunk_last_lone_lf", chunked_req(b"0\n\r\n"), 400),
    ("trailer_lone_lf", chunked_req(b"0\r\nX: y\n\r\n"), 400),
    ("trailer_lone_lf_first", chunked_req(b"0\r\n\n"), 400),
    ("trailer_bare_cr", chunked_req(b"0\r\nX: y\rz\r\n\r\n"), 400),
    ("trailer_obs_fold", chunked_req(b"0\r\nX: y\r\n z\r\n\r\n"), 400),
    ("trailer_no_colon", chunked_req(b"0\r\nXPOST / HTTP/1.1\r\n\r\n"), 400),
    ("trailer_space_before_colon", chunked_req(b"0\r\nX : y\r\n\r\n"), 400),
    # --- bare CR, lone LF, obs-fold, field syntax: RFC 9112 §2.2, §5, RFC 9110 §5.5
    ("lf_only_line_endings", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("lf_after_request_line", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    ("lf_in_middle", req(b"Host: a", b"X: 1\nY: 2", start=b"GET / HTTP/1.1"), 400),
    ("lf_before_final_crlf", b"GET / HTTP/1.1\r\nHost: a\n\r\n", 400),
    ("bare_cr_value", req(b"Host: a", b"Header: va\rlue", start=b"GET / HTTP/1.1"), 400),
    ("bare_cr_line_end", b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", 400),
    ("bare_cr_many", req(b"Host: a", b"Invalid-Header: this\rvalue\ris\rinvalid"), 400),
    ("bare_cr_after_head_fields",
     b"GET / HTTP/1.1\r\nHost: a\r\n\rZGET /evil: HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("bare_cr_field_separator", req(b"Host: a", b"Visible: :/\rSmuggled: :)"), 400),
    ("obs_fold", req(b"Host: a", b"X-Long: a", b"\tcontinued"), 400),
    ("whitespace_before_first_field", req(b" Host: a", start=b"GET / HTTP/1.1"), 400),
    ("space_before_colon", req(b"Host : a", start=b"GET / HTTP/1.1"), 400),
    ("name_with_space", req(b"Host: a", b"Content Length: 5", body=b"hello"), 400),
    ("name_non_ascii", req(b"Host: a", b"\xefoo: bar"), 400),
    ("name_separator_chars", req(b"Host: a", b'X(y)"z: 1'), 400),
    ("name_ctl_chars", req(b"Host: a", b"\x00\x01\x02: whatever"), 400),
    ("name_empty", req(b": ignored", b"Host: a"), 400),
    ("name_and_value_empty", req(b":", b"I: am chopped off", b"Host: a"), 400),
    ("no_colon", req(b"Host: a", b"Te", b"st: test"), 400),
    ("value_nul", req(b"Host: a", b"Test: test\x00THESE BYTES"), 400),
    ("value_nul_end", req(b"Host: a", b"Evil: evil\x00"), 400),
    ("value_nul_host", req(b"Host: google.com\x00.kallus.org", start=b"GET / HTTP/1.1"), 400),
    ("value_del", req(b"Host: a", b"X: a\x7fb"), 400),
    ("value_escape", req(b"Host: a", b"X: \x1b[31m"), 400),
    # --- Host, RFC 9112 §3.2, RFC 9110 §7.2, §4.2
    ("host_missing_11", req(start=b"GET / HTTP/1.1"), 400),
    ("host_missing_absolute_form", req(start=b"GET http://a/ HTTP/1.1"), 400),
    ("host_twice", req(b"Host: a", b"Host: b", start=b"GET / HTTP/1.1"), 400),
    ("host_twice_same", req(b"Host: a", b"host: a", start=b"GET / HTTP/1.1"), 400),
    ("host_twice_http10", req(b"Host: a", b"Host: b", start=b"GET / HTTP/1.0"), 400),
    ("host_empty", req(b"Host: ", start=b"GET / HTTP/1.1"), 400),
    ("host_list", req(b"Host: a, b", start=b"GET / HTTP/1.1"), 400),
    ("host_space", req(b"Host: a b", start=b"GET / HTTP/1.1"), 400),
    ("host_userinfo", req(b"Host: user@a", start=b"GET / HTTP/1.1"), 400),
    ("host_path", req(b"Host: a/b", start=b"GET / HTTP/1.1"), 400),
    ("host_port_letters", req(b"Host: a:http", start=b"GET / HTTP/1.1"), 400),
    ("host_port_too_big", req(b"Host: a:65536", start=b"GET / HTTP/1.1"), 400),
    ("host_port_too_long", req(b"Host: a:000080", start=b"GET / HTTP/1.1"), 400),
    ("host_bad_ipv6", req(b"Host: [::g]", start=b"GET / HTTP/1.1"), 400),
    ("host_unbracketed_ipv6", req(b"Host: ::1", start=b"GET / HTTP/1.1"), 400),
    ("host_obs_text", req(b"Host: \xffa\xff", start=b"GET / HTTP/1.1"), 400),
    ("host_bad_pct", req(b"Host: a%zz", start=b"GET / HTTP/1.1"), 400),
    ("host_invalid_with_absolute_form", req(b"Host: a b", start=b"GET http://a/ HTTP/1.1"), 400),
    # "," and ";" (frameworks split Host on them; never in a DNS name) and escaped CTL/DEL/","/";"
    # are refused although RFC 3986 reg-name has them (docs/http.md "Host").
    ("host_comma_no_space", req(b"Host: a,b", start=b"GET / HTTP/1.1"), 400),
    ("host_comma_trailing", req(b"Host: a.example,", start=b"GET / HTTP/1.1"), 400),
    ("host_comma_with_port", req(b"Host: a:80,b:81", start=b"GET / HTTP/1.1"), 400),
    ("host_semicolon", req(b"Host: a;b", start=b"GET / HTTP/1.1"), 400),
    ("host_semicolon_param", req(b"Host: a.example;x=1", start=b"GET / HTTP/1.1"), 400),
    ("host_pct_nul", req(b"Host: a%00b", start=b"GET / HTTP/1.1"), 400),
    ("host_pct_crlf", req(b"Host: a%0d%0aX-Injected:%201", start=b"GET / HTTP/1.1"), 400),
    ("host_pct_ctl_upper_hex", req(b"Host: a%1Fb", start=b"GET / HTTP/1.1"), 400),
    ("host_pct_del", req(b"Host: a%7fb", start=b"GET / HTTP/1.1"), 400),
    ("host_pct_comma", req(b"Host: a%2Cb", start=b"GET / HTTP/1.1"), 400),
    ("host_pct_semicolon", req(b"Host: a%3bb", start=b"GET / HTTP/1.1"), 400),
    ("host_ipvfuture_comma", req(b"Host: [v1.a,b]", start=b"GET / HTTP/1.1"), 400),
    ("host_comma_absolute_form", req(H, start=b"GET http://a,b/ HTTP/1.1"), 400),
    ("host_pct_nul_absolute_form", req(H, start=b"GET http://a%00b/ HTTP/1.1"), 400),
    ("host_semicolon_connect", req(b"Host: a:443", start=b"CONNECT a;b:443 HTTP/1.1"), 400),
    # --- request-target, RFC 9112 §3.2
    ("target_absolute_userinfo", req(H, start=b"GET http://user@a.example/ HTTP/1.1"), 400),
    ("target_absolute_empty_host", req(H, start=b"GET http:///x HTTP/1.1"), 400),
    ("target_absolute_bad_port", req(H, start=b"GET http://a:x/ HTTP/1.1"), 400),
    ("target_other_scheme", req(H, start=b"GET ftp://a.example/ HTTP/1.1"), 400),
    ("target_relative", req(H, start=b"GET foo/bar HTTP/1.1"), 400),
    ("target_bang", req(H, start=b"GET ! HTTP/1.1"), 400),
    ("target_fragment", req(H, start=b"GET /a#frag HTTP/1.1"), 400),
    ("target_ctl", req(H, start=b"GET /a\x01b HTTP/1.1"), 400),
    ("target_del", req(H, start=b"GET /a\x7f HTTP/1.1"), 400),
    ("target_nul", req(H, start=b"GET /\x00 HTTP/1.1"), 400),
    ("target_non_ascii", req(H, start=b"GET /caf\xc3\xa9 HTTP/1.1"), 400),
    ("target_space", req(H, start=b"GET /a b HTTP/1.1"), 400),
    ("target_tab", req(H, start=b"GET /a\tb HTTP/1.1"), 400),
    ("target_asterisk_not_options", req(H, start=b"GET * HTTP/1.1"), 400),
    ("target_asterisk_post", req(H, b"Content-Length: 0", start=b"POST * HTTP/1.1"), 400),
    ("target_asterisk_head", req(H, start=b"HEAD * HTTP/1.1"), 400),
    ("target_asterisk_with_query", req(H, start=b"OPTIONS *?x HTTP/1.1"), 400),
    ("target_asterisk_with_path", req(H, start=b"OPTIONS */x HTTP/1.1"), 400),
    ("target_connect_origin_form", req(H, start=b"CONNECT / HTTP/1.1"), 400),
    ("target_connect_no_port", req(H, start=b"CONNECT a.example HTTP/1.1"), 400),
    ("target_connect_empty_port", req(H, start=b"CONNECT a.example: HTTP/1.1"), 400),
    # --- request-line grammar, RFC 9112 §3, §2.3; versions RFC 9110 §6.2 / §15.6.6
    ("line_double_space", req(H, start=b"GET  / HTTP/1.1"), 400),
    ("line_tab_separator", req(H, start=b"GET\t/ HTTP/1.1"), 400),
    ("line_trailing_space", req(H, start=b"GET / HTTP/1.1 "), 400),
    ("line_leading_space", req(H, start=b" GET / HTTP/1.1"), 400),
    ("line_lf_separator", b"GET /\nHTTP/1.1\r\n\r\n", 400),
    ("line_http09", b"GET /\r\n\r\n", 400),
    ("line_ice_protocol", req(H, start=b"GET /music ICE/1.0"), 400),  # llhttp test/request/invalid.md
    ("line_rtsp_protocol", req(H, start=b"PUT /music RTSP/1.0"), 400),
    # A complete start line that fails the grammar is refused at once, not after the header
    # timeout: no CRLFCRLF ever follows an HTTP/0.9 request (no EOF in these feedings).
    ("line_http09_no_blank_line", b"GET /\r\n", 400),
    ("line_http09_then_lines", b"GET /\r\nHost: a\r\nX: y\r\n", 400),
    ("line_garbage_incomplete_head", b"hello world\r\nmore", 400),
    ("line_missing_version_incomplete", b"GET / \r\nHost: a\r\n", 400),
    ("line_bad_then_lone_lf", b"GET /\r\nX: a\nb\r\n\r\n", 400),
    # ... and so is a first byte that starts no request line (TLS to the plaintext port, NUL)
    ("line_tls_client_hello_no_crlf", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    ("line_first_byte_nul", b"\x00", 400),
    ("line_first_byte_space_then_lf", b" \n", 400),
    ("line_missing_version", req(H, start=b"GET /"), 400),
    ("line_lowercase_http", req(H, start=b"GET / http/1.1"), 400),
    ("line_version_one_digit", req(H, start=b"GET / HTTP/1"), 400),
    ("line_version_two_minor_digits", req(H, start=b"GET /test HTTP/1.32"), 400),
    ("line_version_overflow", req(H, start=b"GET / HTTP/4294967295.255"), 400),
    ("line_version_garbage", b"GET / HTTP/\r\r1.1\r\n\r\n", 400),
    ("line_version_dots", b"\x00 / HTTP/............0596.7407.\r\n\r\n", 400),
    ("line_method_separators", req(H, start=b'G=":<>(e),[T];?" /get HTTP/1.1'), 400),
    ("line_method_nul", req(H, start=b"G\x00T / HTTP/1.1"), 400),
    ("line_method_empty", req(H, start=b" / HTTP/1.1"), 400),
    ("line_not_http", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    ("version_http12", req(H, start=b"GET / HTTP/1.2"), 505),
    ("version_http20", req(H, start=b"GET / HTTP/2.0"), 505),
    ("version_http09", req(H, start=b"GET / HTTP/0.9"), 505),
    ("h2_prior_knowledge_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("version_505_needs_valid_fields", req(b"X: a\x00", start=b"GET / HTTP/2.0"), 400),
    # --- leading empty lines, RFC 9112 §2.2
    ("leading_empty_lines_too_many", b"\r\n" * 5 + req(H, start=b"GET / HTTP/1.1"), 400),
    ("leading_lone_lf", b"\n" + req(H, start=b"GET / HTTP/1.1"), 400),
    ("leading_crlf_then_lone_lf", b"\r\n\n" + req(H, start=b"GET / HTTP/1.1"), 400),
    ("leading_bare_cr", b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # --- pipelining: an invalid second request is refused after the first was delivered
    ("pipelined_second_invalid", req(H, start=b"GET / HTTP/1.1") + b"Invalid\r\n\r\n", 400),
    # HTTP Garden "bonus bug 3": one byte after a complete chunked request
    ("pipelined_nul_after_chunked", chunked_req(b"0\r\n\r\n").replace(b"POST", b"GET") + b"\x00", 400),
    ("pipelined_zero_cl_then_smuggle",
     req(b"Host: a", b"Content-Length: 0") + req(b"Host: a", b"Content-Length: 5",
                                                 CHUNKED), 400),
]


@pytest.mark.parametrize("data,status", [c[1:] for c in REQUEST_ERRORS],
                         ids=[c[0] for c in REQUEST_ERRORS])
def test_request_refused(data: bytes, status: int) -> None:
    outcome = outcome_everywhere(data)
    assert outcome[0] == "error", outcome
    assert outcome[1] == status, outcome


# --- limits: 431 / 413, with small limits so that byte-by-byte feeding stays quick

LIMIT_ERRORS = [
    ("head_too_large", req(H, b"X: " + b"a" * 600, start=b"GET / HTTP/1.1"),
     dict(max_head=512), 431),
    ("head_too_large_unterminated", b"GET /" + b"a" * 600, dict(max_head=512), 431),
    ("head_too_large_endless_field", b"GET / HTTP/1.1\r\nX: " + b"a" * 600, dict(max_head=512), 431),
    ("head_exactly_one_over", req(H, b"X: " + b"a" * (513 - 40), start=b"GET / HTTP/1.1"),
     dict(max_head=512), 431),
    ("head_bad_eol_before_limit_wins", b"GET / HTTP/1.1\r\nX: a\nb" + b"a" * 600 + b"\r\n\r\n",
     dict(max_head=512), 400),
    ("head_bad_eol_after_limit_is_431", b"GET / HTTP/1.1\r\nX: " + b"a" * 600 + b"\n\r\n\r\n",
     dict(max_head=512), 431),
    ("too_many_headers", req(H, *[b"X-%d: v" % i for i in range(10)], start=b"GET / HTTP/1.1"),
     dict(max_headers=10), 431),
    ("trailers_too_large", chunked_req(b"0\r\nX: " + b"a" * 600 + b"\r\n\r\n"), dict(max_head=512), 431),
    ("too_many_trailers", chunked_req(b"0\r\n" + b"X: 1\r\n" * 11 + b"\r\n"), dict(max_headers=10), 431),
    ("body_cl_too_large", req(H, b"Content-Length: 11", body=b"x" * 11), dict(max_body=10), 413),
    ("body_chunked_too_large", chunked_req(b"6\r\nxxxxxx\r\n5\r\nxxxxx\r\n0\r\n\r\n"),
     dict(max_body=10), 413),
    ("body_chunked_one_huge_chunk", chunked_req(b"ffffffffffffffff\r\n"), dict(max_body=10), 413),
]


@pytest.mark.parametrize("data,limits,status", [c[1:] for c in LIMIT_ERRORS],
                         ids=[c[0] for c in LIMIT_ERRORS])
def test_request_limits(data: bytes, limits: dict, status: int) -> None:
    outcome = outcome_everywhere(data, **limits)
    assert outcome[:2] == ("error", status), outcome


def test_head_limit_is_inclusive() -> None:
    data = req(H, b"X: " + b"a" * (512 - 40), start=b"GET / HTTP/1.1")
    assert len(data) == 512
    assert outcome_everywhere(data, max_head=512)[0] == "ok"
    assert drive([data], max_head=511)[:2] == ("error", 431)


def test_head_never_buffers_more_than_max_head() -> None:
    p = RequestParser(max_head=1024)
    p.feed(b"GET /" + b"a" * 1000)
    assert p.next_event() is NEED_DATA
    p.feed(b"a" * 20)
    with pytest.raises(HTTPError) as exc:
        p.next_event()
    assert exc.value.status == 431


def test_body_limit_cl_refused_before_body_arrives() -> None:
    p = RequestParser(max_body=10)
    p.feed(req(H, b"Content-Length: 100", b"Expect: 100-continue"))
    with pytest.raises(HTTPError) as exc:
        p.next_event()
    assert exc.value.status == 413


def test_eof_mid_head_and_mid_body() -> None:
    for data in (b"GET / HTTP/1.1\r\nHo", req(H, b"Content-Length: 5", body=b"abc"),
                 chunked_req(b"5\r\nab"), chunked_req(b"0\r\nX: 1\r\n")):
        assert drive([data], eof=True)[:2] == ("error", 400), data


def test_eof_between_requests_is_clean() -> None:
    p = RequestParser()
    p.feed(req(H, start=b"GET / HTTP/1.1"))
    assert isinstance(p.next_event(), RequestHead)
    assert isinstance(p.next_event(), EndOfMessage)
    p.start_next()
    p.feed_eof()
    assert p.next_event() is NEED_DATA


def test_errors_are_sticky() -> None:
    p = RequestParser()
    p.feed(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n")
    with pytest.raises(HTTPError) as first:
        p.next_event()
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(HTTPError) as second:
        p.next_event()
    assert second.value is first.value
    assert first.value.status == 400 and "colon" in first.value.reason


@pytest.mark.parametrize(
    "line,reason",
    [
        (b"X-A : 1", "whitespace between header name and colon"),
        (b" X-A: 1", "obsolete line folding (line starts with whitespace)"),
        (b"X-A 1", "header line without colon"),
        (b": 1", "empty header name"),
        (b"X@A: 1", "invalid character in header name"),
        (b"X-A: \x00", "invalid character in header value"),
        (b"X-A: a\rb", "bare CR or LF in head"),
    ],
)
def test_error_reasons_name_the_problem(line: bytes, reason: str) -> None:
    outcome = outcome_everywhere(req(H, line, start=b"GET / HTTP/1.1"))
    assert outcome == ("error", 400, reason)


# ============================================================================================
# Requests that must be accepted, with the fields we expect. Each case: (id, raw, expected
# attributes of the first request, expected body, h11_agrees).

GET_WRK = b"GET / HTTP/1.1\r\nHost: localhost:8080\r\n\r\n"

REQUEST_OK = [
    ("wrk_get", GET_WRK,
     dict(method=b"GET", target=b"/", path=b"/", query=b"", version=11, host=b"localhost:8080",
          headers=[(b"Host", b"localhost:8080")], content_length=None, chunked=False,
          keep_alive=True, upgrade=None, expect_continue=False, connection_tokens=frozenset()),
     b"", True),
    ("path_and_query", req(H, start=b"GET /a/b?x=1&y=2?z HTTP/1.1"),
     dict(path=b"/a/b", query=b"x=1&y=2?z", target=b"/a/b?x=1&y=2?z"), b"", True),
    ("empty_query", req(H, start=b"GET /a? HTTP/1.1"), dict(path=b"/a", query=b""), b"", True),
    ("double_slash_path", req(H, start=b"GET //evil.example/x HTTP/1.1"),
     dict(path=b"//evil.example/x", host=b"a.example"), b"", True),
    ("host_lowercased_port_kept", req(b"Host: WWW.Example.COM:8080", start=b"GET / HTTP/1.1"),
     dict(host=b"www.example.com:8080", headers=[(b"Host", b"WWW.Example.COM:8080")]), b"", True),
    ("host_ipv6", req(b"Host: [::1]:8080", start=b"GET / HTTP/1.1"), dict(host=b"[::1]:8080"),
     b"", True),
    ("host_ipv4", req(b"Host: 127.0.10.1", start=b"GET / HTTP/1.1"), dict(host=b"127.0.10.1"),
     b"", True),
    ("host_ipv4_port", req(b"Host: 127.0.10.1:8080", start=b"GET / HTTP/1.1"), dict(host=b"127.0.10.1:8080"),
     b"", True),
    ("host_ipv6_no_port", req(b"Host: [2001:DB8::1]", start=b"GET / HTTP/1.1"), dict(host=b"[2001:db8::1]"),
     b"", True),
    ("host_pct_unreserved", req(b"Host: %61.example:80", start=b"GET / HTTP/1.1"),
     dict(host=b"%61.example:80"), b"", True),
    ("host_pct_utf8", req(b"Host: caf%C3%A9.example", start=b"GET / HTTP/1.1"),
     dict(host=b"caf%c3%a9.example"), b"", True),
    ("host_sub_delims", req(b"Host: a!$&'()*+=b", start=b"GET / HTTP/1.1"), dict(host=b"a!$&'()*+=b"),
     b"", True),
    ("host_trailing_dot_and_empty_port", req(b"Host: a.example.:", start=b"GET / HTTP/1.1"),
     dict(host=b"a.example.:"), b"", True),
    ("absolute_form_authority_wins", req(b"Host: other", start=b"GET http://Example.COM:8080/p?q HTTP/1.1"),
     dict(host=b"example.com:8080", path=b"/p", query=b"q", target=b"http://Example.COM:8080/p?q"),
     b"", True),
    ("absolute_form_https_empty_path", req(H, start=b"GET HTTPS://b.example HTTP/1.1"),
     dict(host=b"b.example", path=b"/", query=b""), b"", True),
    ("absolute_form_query_without_path", req(H, start=b"GET http://b.example?x=1 HTTP/1.1"),
     dict(host=b"b.example", path=b"/", query=b"x=1"), b"", True),
    ("asterisk_options", req(H, start=b"OPTIONS * HTTP/1.1"),
     dict(method=b"OPTIONS", target=b"*", path=b"*", query=b""), b"", True),
    ("connect_authority_form", req(b"Host: a.example:443", start=b"CONNECT A.example:443 HTTP/1.1"),
     dict(method=b"CONNECT", host=b"a.example:443", path=b"", query=b""), b"", True),
    ("extension_method", req(H, start=b"PURGE /x HTTP/1.1"), dict(method=b"PURGE"), b"", True),
    ("http10_no_host", b"GET / HTTP/1.0\r\n\r\n",
     dict(version=10, host=b"", keep_alive=False, headers=[]), b"", True),
    ("http10_keep_alive", req(b"Connection: Keep-Alive", H, start=b"GET / HTTP/1.0"),
     dict(version=10, keep_alive=True, connection_tokens=frozenset({b"keep-alive"})), b"", True),
    ("http10_upgrade_ignored", req(H, b"Connection: upgrade", b"Upgrade: websocket", start=b"GET / HTTP/1.0"),
     dict(upgrade=None, keep_alive=False), b"", True),
    ("http10_expect_ignored", req(H, b"Expect: 100-continue", b"Content-Length: 2", body=b"ok",
                                  start=b"POST / HTTP/1.0"),
     dict(expect_continue=False, content_length=2), b"ok", True),
    ("http11_close", req(H, b"Connection: close", start=b"GET / HTTP/1.1"),
     dict(keep_alive=False, connection_tokens=frozenset({b"close"})), b"", True),
    ("close_beats_keep_alive",
     req(H, b"Connection: keep-alive", b"Connection: close", start=b"GET / HTTP/1.0"),
     dict(keep_alive=False), b"", True),
    ("connection_list", req(H, b"Connection: Keep-Alive, X-Custom,, TE", start=b"GET / HTTP/1.1"),
     dict(connection_tokens=frozenset({b"keep-alive", b"x-custom", b"te"})), b"", True),
    ("websocket_upgrade", req(H, b"Connection: keep-alive, Upgrade", b"Upgrade: websocket",
                              b"Sec-WebSocket-Version: 13", start=b"GET /ws HTTP/1.1"),
     dict(upgrade=b"websocket", keep_alive=True), b"", True),
    ("upgrade_without_connection_token", req(H, b"Upgrade: websocket", start=b"GET / HTTP/1.1"),
     dict(upgrade=None), b"", True),
    # Only websocket is tunnelled (docs/http.md "Upgrade"); h2c would give the client a raw
    # HTTP/2 connection to the pod past the path rules. These are plain requests (l7.headers drops
    # Upgrade and HTTP2-Settings), a 101 to them is a 502.
    ("h2c_upgrade_is_a_plain_request",
     b"GET / HTTP/1.1\r\nHost: foo.bar.com\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
     b"Connection: Upgrade\r\n\r\n",
     dict(upgrade=None, keep_alive=True, connection_tokens=frozenset({b"upgrade"})), b"", True),
    ("h2c_upgrade_with_settings_token", req(H, b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c",
                                            b"HTTP2-Settings: AAMAAABkAAQAAP__", start=b"GET / HTTP/1.1"),
     dict(upgrade=None), b"", True),
    ("upgrade_other_protocol", req(H, b"Connection: upgrade", b"Upgrade: TLS/1.2", start=b"GET / HTTP/1.1"),
     dict(upgrade=None), b"", True),
    ("upgrade_websocket_case_insensitive", req(H, b"Connection: Upgrade", b"Upgrade: WebSocket",
                                               start=b"GET /ws HTTP/1.1"),
     dict(upgrade=b"WebSocket"), b"", True),
    ("upgrade_websocket_among_others", req(H, b"Connection: Upgrade", b"Upgrade: h2c, websocket",
                                           start=b"GET /ws HTTP/1.1"),
     dict(upgrade=b"websocket"), b"", True),
    ("upgrade_websocket_versioned_is_not_websocket", req(H, b"Connection: Upgrade", b"Upgrade: websocket/13",
                                                         start=b"GET /ws HTTP/1.1"),
     dict(upgrade=None), b"", True),
    ("upgrade_websocket_content_length_zero", req(H, b"Connection: Upgrade", b"Upgrade: websocket",
                                                  b"Content-Length: 0", start=b"GET /ws HTTP/1.1"),
     dict(upgrade=b"websocket", content_length=0), b"", True),
    ("upgrade_websocket_with_body", req(H, b"Connection: Upgrade", b"Upgrade: websocket",
                                        b"Content-Length: 5", body=b"hello", start=b"GET /ws HTTP/1.1"),
     dict(upgrade=None, content_length=5), b"hello", True),
    ("upgrade_websocket_chunked", req(H, b"Connection: Upgrade", b"Upgrade: websocket", CHUNKED,
                                      body=b"0\r\n\r\n", start=b"GET /ws HTTP/1.1"),
     dict(upgrade=None, chunked=True), b"", True),
    ("upgrade_websocket_post", req(H, b"Connection: Upgrade", b"Upgrade: websocket", start=b"POST /ws HTTP/1.1"),
     dict(upgrade=None), b"", True),
    ("expect_100_continue", req(H, b"Expect: 100-Continue", b"Content-Length: 5", body=b"hello"),
     dict(expect_continue=True, content_length=5), b"hello", True),
    ("expect_other_ignored", req(H, b"Expect: something"), dict(expect_continue=False), b"", True),
    ("post_content_length", req(H, b"Content-Type: text/plain", b"Content-Length: 11", body=b"hello world"),
     dict(content_length=11, chunked=False,
          headers=[(b"Host", b"a.example"), (b"Content-Type", b"text/plain")]),
     b"hello world", True),
    ("content_length_zero", req(H, b"Content-Length: 0"), dict(content_length=0), b"", True),
    ("content_length_leading_zeros", req(H, b"Content-Length: 005", body=b"hello"),
     dict(content_length=5), b"hello", True),
    ("content_length_19_digits_ok", req(H, b"Content-Length: 0000000000000000005", body=b"hello"),
     dict(content_length=5), b"hello", True),
    ("content_length_repeated_same", req(H, b"Content-Length: 5", b"content-length: 5", body=b"hello"),
     dict(content_length=5, headers=[(b"Host", b"a.example")]), b"hello", True),
    ("content_length_list_same", req(H, b"Content-Length: 5, 5", body=b"hello"),
     dict(content_length=5), b"hello", True),
    ("get_with_body_is_streamed", req(H, b"Content-Length: 10", body=b"1234567890", start=b"GET / HTTP/1.1"),
     dict(method=b"GET", content_length=10), b"1234567890", True),
    ("chunked_simple", chunked_req(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
     dict(chunked=True, content_length=None, headers=[(b"Host", b"a")]), b"hello world", True),
    ("chunked_hex_cases", chunked_req(b"A\r\n0123456789\r\nb\r\n0123456789a\r\n0\r\n\r\n"),
     dict(chunked=True), b"01234567890123456789a", True),
    ("chunked_size_leading_zeros", chunked_req(b"0005\r\nhello\r\n000\r\n\r\n"),
     dict(chunked=True), b"hello", True),
    ("chunked_extensions", chunked_req(b'5;a=b;c="d;e\\"f" ; g\r\nhello\r\n0;last\r\n\r\n'),
     dict(chunked=True), b"hello", True),
    # RFC 9112 §7.1.1 allows BWS around ";" and "=" in chunk extensions; h11 does not.
    ("chunked_extension_bws", chunked_req(b"5 ;ext = 1\r\nhello\r\n0\r\n\r\n"), dict(chunked=True),
     b"hello", False),
    ("chunked_16_hex_digits", chunked_req(b"0000000000000005\r\nhello\r\n0\r\n\r\n"), dict(chunked=True),
     b"hello", True),
    ("te_case_insensitive", req(b"Host: a", b"TRANSFER-ENCODING: CHUNKED", body=b"1\r\nZ\r\n0\r\n\r\n"),
     dict(chunked=True, headers=[(b"Host", b"a")]), b"Z", True),
    ("te_tab_ows", req(b"Host: a", b"Transfer-Encoding:\tchunked\t", body=b"1\r\nZ\r\n0\r\n\r\n"),
     dict(chunked=True), b"Z", True),
    # RFC 9110 §5.6.1: empty list members are ignored; we re-frame, so nothing ambiguous leaves.
    ("te_empty_list_member", req(b"Host: a", b"Transfer-Encoding: ,chunked", body=b"1\r\nZ\r\n0\r\n\r\n"),
     dict(chunked=True), b"Z", False),
    ("chunked_trailers_filtered", chunked_req(
        b"1\r\nZ\r\n0\r\nX-Checksum: abc\r\nContent-Length: 5\r\nHost: evil\r\n"
        b"Transfer-Encoding: chunked\r\nX_Under: 1\r\nServer-Timing: db;dur=5\r\n\r\n"),
     dict(chunked=True), b"Z", True),
    ("trailer_that_looks_like_a_request_line", chunked_req(b"0\r\nX:POST / HTTP/1.1\r\n\r\n"),
     dict(chunked=True), b"", True),
    ("header_values_ows_stripped", req(H, b"X-A:   a b \t", b"X-B:", b"X-C:\tc", start=b"GET / HTTP/1.1"),
     dict(headers=[(b"Host", b"a.example"), (b"X-A", b"a b"), (b"X-B", b""), (b"X-C", b"c")]), b"", True),
    ("header_obs_text_value", req(H, b"X-Name: caf\xc3\xa9 \x80\xff", start=b"GET / HTTP/1.1"),
     dict(headers=[(b"Host", b"a.example"), (b"X-Name", b"caf\xc3\xa9 \x80\xff")]), b"", True),
    ("header_case_and_order_kept", req(b"x-b: 2", H, b"X-A: 1", b"x-b: 3", start=b"GET / HTTP/1.1"),
     dict(headers=[(b"x-b", b"2"), (b"Host", b"a.example"), (b"X-A", b"1"), (b"x-b", b"3")]), b"", True),
    ("header_all_tchars", req(H, b"!#$%&'*+-.^`|~09azAZ: v", start=b"GET / HTTP/1.1"),
     dict(headers=[(b"Host", b"a.example"), (b"!#$%&'*+-.^`|~09azAZ", b"v")]), b"", True),
    # nginx's underscores_in_headers off: "_" names never reach a pod (docs/http.md).
    ("underscore_headers_dropped", req(H, b"X_Forwarded_For: 6.6.6.6", b"X-Real: 1", start=b"GET / HTTP/1.1"),
     dict(headers=[(b"Host", b"a.example"), (b"X-Real", b"1")]), b"", True),
    ("underscore_te_is_not_te",
     req(b"Host: a", b"Transfer_Encoding: chunked", b"Content-Length: 5", body=b"hello"),
     dict(chunked=False, content_length=5, headers=[(b"Host", b"a")]), b"hello", True),
    ("underscore_cl_is_not_cl", req(b"Host: a", b"Content_Length: 5", start=b"GET / HTTP/1.1"),
     dict(content_length=None, headers=[(b"Host", b"a")]), b"", True),
    # RFC 9112 §2.2 SHOULD ignore leading CRLFs; h11 refuses them.
    ("leading_empty_lines_ignored", b"\r\n" * 4 + req(H, start=b"GET / HTTP/1.1"),
     dict(method=b"GET"), b"", False),
]


@pytest.mark.parametrize("data,expected,body,h11_agrees", [c[1:] for c in REQUEST_OK],
                         ids=[c[0] for c in REQUEST_OK])
def test_request_accepted(data: bytes, expected: dict, body: bytes, h11_agrees: bool) -> None:
    outcome = outcome_everywhere(data)
    assert outcome[0] == "ok", outcome
    heads, got_body, trailers, complete = outcome[1][0]
    assert complete
    p = RequestParser()
    p.feed(data)
    head = p.next_event()
    assert isinstance(head, RequestHead)
    assert request_fields(head) == heads[0]
    for attr, value in expected.items():
        assert getattr(head, attr) == value, attr
    assert got_body == body
    if h11_agrees:
        assert_h11_agrees(data, head, body)


def assert_h11_agrees(data: bytes, head: RequestHead, body: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    assert event.method == head.method and event.target == head.target
    ours = [(n.lower(), v) for n, v in head.headers]
    theirs = [(n, v) for n, v in event.headers
              if n not in (b"content-length", b"transfer-encoding") and b"_" not in n]
    assert ours == theirs
    got = b""
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.Data):
            got += ev.data
        else:
            assert isinstance(ev, h11.EndOfMessage), ev
            break
    assert got == body


def test_chunked_trailers_filtered() -> None:
    outcome = outcome_everywhere(dict(REQUEST_OK_BY_ID)["chunked_trailers_filtered"])
    assert outcome[1][0][2] == ((b"X-Checksum", b"abc"), (b"Server-Timing", b"db;dur=5"))


REQUEST_OK_BY_ID = [(c[0], c[1]) for c in REQUEST_OK]


def test_underscore_headers_kept_when_allowed() -> None:
    p = RequestParser(drop_underscore_headers=False)
    p.feed(req(H, b"X_Real_IP: 1", start=b"GET / HTTP/1.1"))
    head = p.next_event()
    assert head.headers == [(b"Host", b"a.example"), (b"X_Real_IP", b"1")]


# ============================================================================================
# Pipelining, PAUSED, trailing bytes


def test_pipelined_requests_one_at_a_time() -> None:
    data = (req(H, start=b"GET /1 HTTP/1.1")
            + req(H, b"Content-Length: 37", body=b"GET /not-a-request HTTP/1.1\r\nX: y\r\n\r\n")
            + chunked_req(b"3\r\nabc\r\n0\r\n\r\n")
            + req(H, b"Connection: close", start=b"GET /4 HTTP/1.1"))
    outcome = outcome_everywhere(data)
    assert outcome[0] == "ok"
    messages = outcome[1]
    assert [m[0][0][1] for m in messages] == [b"/1", b"/", b"/", b"/4"]
    assert [m[1] for m in messages] == [b"", b"GET /not-a-request HTTP/1.1\r\nX: y\r\n\r\n", b"abc", b""]
    assert messages[3][0][0][9] is False  # keep_alive of the last one


def test_paused_until_start_next_and_next_request_stays_buffered() -> None:
    p = RequestParser()
    second = req(H, start=b"GET /2 HTTP/1.1")
    p.feed(req(H, start=b"GET /1 HTTP/1.1") + second)
    assert p.next_event().target == b"/1"
    assert p.next_event() == EndOfMessage([])
    assert p.next_event() is PAUSED
    assert p.next_event() is PAUSED
    assert p.trailing == second
    with pytest.raises(RuntimeError):
        RequestParser().start_next()
    p.start_next()
    assert p.next_event().target == b"/2"


def test_connect_leaves_tunnel_bytes_in_trailing() -> None:
    data = req(b"Host: a:443", start=b"CONNECT a:443 HTTP/1.1") + b"\x16\x03\x01tls bytes"
    outcome = outcome_everywhere(data)
    assert outcome[0] == "ok" and outcome[2] == b"\x16\x03\x01tls bytes"


@pytest.mark.parametrize("first_line,more,reason", [
    (b"GET /\r\n", b"", "malformed request line"),
    (b"GET /\r\n", b"X: a\nb", "malformed request line"),
    (b"GET / HTTP/1.1 \r\n", b"Host: a\r\n", "malformed request line"),
    (b"\x16\x03\x01\x02\x00\x01\x00\r\n", b"", "malformed request line"),
    (b"GET / HTTP/1\r1\r\n", b"", "bare CR or LF in head"),
])
def test_invalid_request_line_refused_as_soon_as_complete(first_line, more, reason) -> None:
    """No CRLFCRLF needed (and no EOF, no header timeout): the complete first line decides, with
    the reason the whole head would get (outcome_everywhere checks every split)."""
    assert outcome_everywhere(first_line + more) == ("error", 400, reason)
    assert outcome_everywhere(first_line + more + b"\r\n\r\n") == ("error", 400, reason)
    p = RequestParser()
    p.feed(first_line[:-1])
    try:
        assert p.next_event() is NEED_DATA
    except HTTPError as exc:  # a bare CR is refused as soon as the byte after it arrives
        assert (exc.status, exc.reason) == (400, reason)
        return
    p.feed(first_line[-1:] + more)
    with pytest.raises(HTTPError) as exc:
        p.next_event()
    assert (exc.value.status, exc.value.reason) == (400, reason)


@pytest.mark.parametrize("data", [b"\x16", b"\x16\x03\x01\x02\x00", b"\x00GET", b" GET / HTTP/1.1", b"\r\n\x80"])
def test_impossible_first_byte_refused_at_once(data) -> None:
    p = RequestParser()
    p.feed(data)
    with pytest.raises(HTTPError) as exc:
        p.next_event()
    assert (exc.value.status, exc.value.reason) == (400, "malformed request line")
    r = ResponseParser()
    r.set_request_method(b"GET")
    r.feed(b"<" + data)
    with pytest.raises(HTTPError) as exc:
        r.next_event()
    assert (exc.value.status, exc.value.reason) == (502, "malformed status line")


def test_valid_request_line_still_waits_for_the_head() -> None:
    p = RequestParser()
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n")
    assert p.next_event() is NEED_DATA
    p.feed(b"\r\n")
    assert isinstance(p.next_event(), RequestHead)
    # HTTP/2.0 matches the grammar: its 505 needs the complete head (fields are checked first).
    p = RequestParser()
    p.feed(b"GET / HTTP/2.0\r\n")
    assert p.next_event() is NEED_DATA


def test_invalid_status_line_refused_as_soon_as_complete() -> None:
    for line in (b"<html>hello</html>\r\n", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n", b"HTTP/1.1\r\n"):
        r = ResponseParser()
        r.set_request_method(b"GET")
        r.feed(line)
        with pytest.raises(HTTPError) as exc:
            r.next_event()
        assert (exc.value.status, exc.value.reason) == (502, "malformed status line")
        assert outcome_everywhere(line, response=True) == ("error", 502, "malformed status line")
    r = ResponseParser()
    r.set_request_method(b"GET")
    r.feed(b"HTTP/1.1 200 OK\r\n")
    assert r.next_event() is NEED_DATA


def test_start_line_check_with_oversize_head() -> None:
    """A complete bad start line within max_head wins over 431, fed whole or piecemeal."""
    data = b"GET /\r\nX: " + b"a" * 600 + b"\r\n\r\n"
    assert outcome_everywhere(data, max_head=512) == ("error", 400, "malformed request line")
    data = b"GET /" + b"a" * 600 + b"\r\n\r\n"
    assert outcome_everywhere(data, max_head=512)[:2] == ("error", 431)


def test_upgrade_request_leaves_bytes_in_trailing() -> None:
    p = RequestParser()
    p.feed(req(H, b"Connection: Upgrade", b"Upgrade: websocket", start=b"GET /ws HTTP/1.1")
           + b"\x81\x05hello")
    head = p.next_event()
    assert head.upgrade == b"websocket"
    assert isinstance(p.next_event(), EndOfMessage)
    assert p.next_event() is PAUSED
    assert p.trailing == b"\x81\x05hello"


def test_body_is_streamed_not_buffered() -> None:
    p = RequestParser()
    p.feed(req(H, b"Content-Length: 10", body=b"abc"))
    assert isinstance(p.next_event(), RequestHead)
    assert p.next_event() == b"abc"
    assert p.next_event() is NEED_DATA
    p.feed(b"defghij")
    assert p.next_event() == b"defghij"
    assert isinstance(p.next_event(), EndOfMessage)


def test_chunked_body_streamed_per_piece() -> None:
    p = RequestParser()
    p.feed(chunked_req(b"a\r\n01234"))
    assert isinstance(p.next_event(), RequestHead)
    assert p.next_event() == b"01234"
    assert p.next_event() is NEED_DATA
    p.feed(b"56789\r\n0\r\n\r\n")
    assert p.next_event() == b"56789"
    assert p.next_event() == EndOfMessage([])


def test_incremental_scans_do_not_rescan() -> None:
    """Byte-by-byte feeding stays O(n): each incomplete head / chunk line / trailer section is
    searched only from where the previous search stopped."""
    p = RequestParser()
    head = req(H, *[b"X-%d: %s" % (i, b"v" * 50) for i in range(50)], CHUNKED, start=b"POST / HTTP/1.1")
    for i in range(len(head) - 1):
        p.feed(head[i : i + 1])
        assert p.next_event() is NEED_DATA
        assert p._scan == len(p._buf)  # the next search starts at the new byte
    p.feed(head[-1:])
    assert isinstance(p.next_event(), RequestHead)
    line = b"5;" + b";".join(b"e%d=v" % i for i in range(300)) + b"\r\n"
    for i in range(len(line) - 1):
        p.feed(line[i : i + 1])
        assert p.next_event() is NEED_DATA
        assert p._scan == len(p._buf)
    p.feed(b"\n" + b"hello\r\n0\r\nX: " + b"y" * 100)
    assert p.next_event() == b"hello"
    assert p.next_event() is NEED_DATA
    assert p._scan == len(p._buf)


# ============================================================================================
# Responses


def resp(start: bytes, *lines: bytes, body: bytes = b"") -> bytes:
    return start + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


OK200 = b"HTTP/1.1 200 OK"

RESPONSE_ERRORS = [
    ("cl_te", resp(OK200, b"Content-Length: 5", CHUNKED, body=b"0\r\n\r\n")),
    ("te_cl", resp(OK200, CHUNKED, b"Content-Length: 5", body=b"0\r\n\r\n")),
    ("cl_conflicting", resp(OK200, b"Content-Length: 5", b"Content-Length: 6", body=b"hello!")),
    ("cl_conflicting_list", resp(OK200, b"Content-Length: 5, 6", body=b"hello!")),
    ("cl_invalid", resp(OK200, b"Content-Length: 0x5", body=b"hello")),
    ("cl_negative", resp(OK200, b"Content-Length: -1")),
    ("cl_too_large", resp(OK200, b"Content-Length: 99999999999999999999")),
    ("cl_invalid_on_204", resp(b"HTTP/1.1 204 No Content", b"Content-Length: x")),
    ("te_gzip_only", resp(OK200, b"Transfer-Encoding: gzip", body=b"...")),
    ("te_gzip_chunked", resp(OK200, b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n")),
    ("te_chunked_twice", resp(OK200, CHUNKED, CHUNKED, body=b"0\r\n\r\n")),
    ("te_http10", resp(b"HTTP/1.0 200 OK", CHUNKED, body=b"0\r\n\r\n")),
    ("te_xchunked", resp(OK200, b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n")),
    ("status_two_digits", resp(b"HTTP/1.1 20 OK")),
    ("status_four_digits", resp(b"HTTP/1.1 2000 OK")),
    ("status_below_100", resp(b"HTTP/1.1 099 Odd")),
    ("status_above_599", resp(b"HTTP/1.1 600 Odd")),
    ("status_letters", resp(b"HTTP/1.1 2OO OK")),
    ("status_line_double_space", resp(b"HTTP/1.1  200 OK")),
    ("status_line_lowercase", resp(b"http/1.1 200 OK")),
    ("status_line_http2", resp(b"HTTP/2 200")),
    ("status_line_http20", resp(b"HTTP/2.0 200 OK")),
    ("status_line_http09", b"<html>hello</html>\r\n\r\n"),
    # complete, invalid status line without the rest of the head: 502 at once, no timeout
    ("status_line_http09_no_blank_line", b"<html>hello</html>\r\n"),
    ("status_line_bad_head_incomplete", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n"),
    ("status_line_garbage_no_crlf", b"<html>"),
    ("reason_nul", resp(b"HTTP/1.1 200 O\x00K")),
    ("reason_bare_cr", resp(b"HTTP/1.1 200 O\rK")),
    ("lone_lf", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ("obs_fold", resp(OK200, b"X: a", b" b", b"Content-Length: 0")),
    ("space_before_colon", resp(OK200, b"Content-Length : 0")),
    ("value_nul", resp(OK200, b"X: a\x00", b"Content-Length: 0")),
    ("chunk_size_0x", resp(OK200, CHUNKED, body=b"0x5\r\nhello\r\n0\r\n\r\n")),
    ("chunk_data_no_crlf", resp(OK200, CHUNKED, body=b"5\r\nhelloX\r\n0\r\n\r\n")),
    ("chunk_ext_nul", resp(OK200, CHUNKED, body=b"5;\x00\r\nhello\r\n0\r\n\r\n")),
    ("eof_mid_length_body", resp(OK200, b"Content-Length: 10", body=b"short")),
    ("eof_mid_chunked_body", resp(OK200, CHUNKED, body=b"5\r\nhel")),
    ("eof_mid_head", b"HTTP/1.1 200 OK\r\nContent-Le"),
    ("eof_before_any_byte", b""),
    ("eof_after_interim_only", resp(b"HTTP/1.1 100 Continue")),
]


@pytest.mark.parametrize("data", [c[1] for c in RESPONSE_ERRORS], ids=[c[0] for c in RESPONSE_ERRORS])
def test_response_refused_with_502(data: bytes) -> None:
    outcome = outcome_everywhere(data, response=True, eof=True)
    assert outcome[:2] == ("error", 502), outcome


def test_response_head_too_large() -> None:
    data = resp(OK200, b"X: " + b"a" * 600, b"Content-Length: 0")
    assert outcome_everywhere(data, response=True, max_head=512)[:2] == ("error", 502)
    assert outcome_everywhere(data, response=True, max_head=1024)[0] == "ok"


def test_response_unsolicited_data() -> None:
    p = ResponseParser()
    p.feed(resp(OK200, b"Content-Length: 0"))
    with pytest.raises(HTTPError) as exc:
        p.next_event()
    assert exc.value.status == 502


def test_idle_upstream_close_is_not_an_error() -> None:
    p = ResponseParser()
    p.feed_eof()
    assert p.next_event() is NEED_DATA


RESPONSE_OK = [
    # (id, raw, request methods, attributes of the final head, body, trailers)
    ("length", resp(OK200, b"Content-Length: 5", b"Server: pod", body=b"hello"), [b"GET"],
     dict(status=200, reason=b"OK", version=11, content_length=5, chunked=False, keep_alive=True,
          headers=[(b"Server", b"pod")]), b"hello", ()),
    ("chunked_with_trailers", resp(OK200, CHUNKED, b"Trailer: X-Sum",
                                   body=b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nSet-Cookie: a=b\r\n\r\n"),
     [b"GET"], dict(chunked=True, headers=[(b"Trailer", b"X-Sum")]), b"abc", ((b"X-Sum", b"1"),)),
    ("close_delimited", resp(OK200, b"Content-Type: text/plain", body=b"until the end"), [b"GET"],
     dict(keep_alive=False, content_length=None, chunked=False), b"until the end", ()),
    ("http10_close_delimited", resp(b"HTTP/1.0 200 OK", body=b"old"), [b"GET"],
     dict(version=10, keep_alive=False), b"old", ()),
    ("http10_keep_alive",
     resp(b"HTTP/1.0 200 OK", b"Connection: keep-alive", b"Content-Length: 2", body=b"ok"),
     [b"GET"], dict(version=10, keep_alive=True), b"ok", ()),
    ("connection_close", resp(OK200, b"Connection: close", b"Content-Length: 2", body=b"ok"), [b"GET"],
     dict(keep_alive=False, connection_tokens=frozenset({b"close"})), b"ok", ()),
    ("head_response_has_no_body", resp(OK200, b"Content-Length: 1234"), [b"HEAD"],
     dict(content_length=1234, keep_alive=True), b"", ()),
    ("head_response_chunked_has_no_body", resp(OK200, CHUNKED), [b"HEAD"], dict(chunked=True), b"", ()),
    ("no_content_204", resp(b"HTTP/1.1 204 No Content", b"Content-Length: 10"), [b"GET"],
     dict(status=204, content_length=10), b"", ()),
    ("not_modified_304", resp(b"HTTP/1.1 304 Not Modified", b"Content-Length: 10", b"ETag: \"x\""), [b"GET"],
     dict(status=304, content_length=10), b"", ()),
    ("no_reason", b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", [b"GET"], dict(reason=b""), b"", ()),
    ("empty_reason", b"HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n", [b"GET"],
     dict(status=404, reason=b""), b"", ()),
    ("reason_with_spaces_and_obs_text", resp(b"HTTP/1.1 200 All \tgood \xff"), [b"HEAD"],
     dict(reason=b"All \tgood \xff"), b"", ()),
    ("underscore_header_passed", resp(OK200, b"X_Pod: 1", b"Content-Length: 0"), [b"GET"],
     dict(headers=[(b"X_Pod", b"1")]), b"", ()),
    ("cl_repeated_same", resp(OK200, b"Content-Length: 2", b"Content-Length: 2", body=b"ok"), [b"GET"],
     dict(content_length=2, headers=[]), b"ok", ()),
]


@pytest.mark.parametrize("data,methods,expected,body,trailers", [c[1:] for c in RESPONSE_OK],
                         ids=[c[0] for c in RESPONSE_OK])
def test_response_accepted(data, methods, expected, body, trailers) -> None:
    outcome = outcome_everywhere(data, response=True, methods=methods, eof=True)
    assert outcome[0] == "ok", outcome
    heads, got_body, got_trailers, complete = outcome[1][0]
    assert complete and got_body == body and got_trailers == trailers
    p = ResponseParser()
    p.set_request_method(methods[0])
    p.feed(data)
    head = p.next_event()
    for attr, value in expected.items():
        assert getattr(head, attr) == value, attr
    assert_h11_agrees_response(data, methods[0], head, body)


def assert_h11_agrees_response(data: bytes, method: bytes, head: ResponseHead, body: bytes) -> None:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, h11.Response) and event.status_code == head.status
    assert [(n.lower(), v) for n, v in head.headers] == [
        (n, v) for n, v in event.headers if n not in (b"content-length", b"transfer-encoding")
    ]
    got = b""
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.Data):
            got += ev.data
        else:
            assert isinstance(ev, h11.EndOfMessage), ev
            break
    assert got == body


def test_response_100_continue_then_final() -> None:
    data = resp(b"HTTP/1.1 100 Continue") + resp(b"HTTP/1.1 103 Early Hints", b"Link: </s.css>") + resp(
        OK200, b"Content-Length: 2", body=b"ok")
    outcome = outcome_everywhere(data, response=True, methods=[b"POST"])
    heads, body, trailers, complete = outcome[1][0]
    assert [h[0] for h in heads] == [100, 103, 200]
    assert body == b"ok" and complete


def test_response_101_switching_protocols_ends_message() -> None:
    data = resp(b"HTTP/1.1 101 Switching Protocols", b"Connection: Upgrade",
                b"Upgrade: websocket") + b"\x81\x02hi"
    outcome = outcome_everywhere(data, response=True, methods=[b"GET"])
    heads, body, trailers, complete = outcome[1][0]
    assert heads[0][0] == 101 and complete and body == b""
    assert heads[0][6] is False  # keep_alive: the connection is no longer HTTP
    assert outcome[2] == b"\x81\x02hi"


def test_response_connect_200_is_a_tunnel() -> None:
    data = resp(OK200, b"Content-Length: 100") + b"tunnel bytes"
    outcome = outcome_everywhere(data, response=True, methods=[b"CONNECT"])
    heads, body, trailers, complete = outcome[1][0]
    assert complete and body == b"" and outcome[2] == b"tunnel bytes"


def test_response_pipeline_head_then_get() -> None:
    data = resp(OK200, b"Content-Length: 5") + resp(OK200, b"Content-Length: 5", body=b"hello")
    outcome = outcome_everywhere(data, response=True, methods=[b"HEAD", b"GET"])
    assert [m[1] for m in outcome[1]] == [b"", b"hello"]


def test_response_body_kind_table() -> None:
    def head(status, cl=None, chunked=False):
        return ResponseHead(status, b"", 11, [], cl, chunked, True, frozenset())

    assert head(200, 5).body_kind(b"HEAD") == "none"
    assert head(100).body_kind(b"GET") == "none"
    assert head(204, 5).body_kind(b"GET") == "none"
    assert head(304, 5).body_kind(b"GET") == "none"
    assert head(200, 5).body_kind(b"CONNECT") == "none"
    assert head(407, 5).body_kind(b"CONNECT") == "length"
    assert head(200, None, True).body_kind(b"GET") == "chunked"
    assert head(200, 0).body_kind(b"GET") == "length"
    assert head(200).body_kind(b"POST") == "close"


# ============================================================================================
# Serializers


def test_serialize_request_head_is_canonical() -> None:
    out = serialize_request_head(b"POST", b"/x?y", [(b"Host", b"a"), (b"X-A", b"1")],
                                 content_length=5, chunked=False)
    assert out == b"POST /x?y HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n"
    out = serialize_request_head(b"GET", b"/", [(b"Host", b"a")], content_length=None, chunked=True)
    assert out.endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    out = serialize_request_head(b"GET", b"/", [], content_length=None, chunked=False)
    assert out == b"GET / HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize(
    "method,target,headers,cl,chunked",
    [
        (b"GET", b"/", [(b"Content-Length", b"5")], None, False),
        (b"GET", b"/", [(b"transfer-encoding", b"chunked")], None, False),
        (b"GET", b"/", [(b"X", b"a\r\nInjected: 1")], None, False),
        (b"GET", b"/", [(b"X Y", b"1")], None, False),
        (b"GET", b"/", [(b"X", b" padded")], None, False),
        (b"GET", b"/", [], 5, True),
        (b"GET", b"/", [], -1, False),
        (b"G T", b"/", [], None, False),
        (b"GET", b"/a b", [], None, False),
        (b"GET", b"/\r\n", [], None, False),
    ],
)
def test_serialize_request_head_refuses_bad_input(method, target, headers, cl, chunked) -> None:
    with pytest.raises(ValueError):
        serialize_request_head(method, target, headers, content_length=cl, chunked=chunked)


def test_serialize_response_head() -> None:
    out = serialize_response_head(200, b"OK", [(b"Server", b"meshproxy")], content_length=0,
                                  chunked=False)
    assert out == b"HTTP/1.1 200 OK\r\nServer: meshproxy\r\nContent-Length: 0\r\n\r\n"
    assert serialize_response_head(404, b"", [], content_length=None, chunked=False, version=10) == (
        b"HTTP/1.0 404 \r\n\r\n")
    for kwargs in (dict(status=99), dict(status=200, reason=b"a\r\n"),
                   dict(status=200, version=10, chunked=True), dict(status=200, version=20)):
        args = dict(status=200, reason=b"OK", headers=[], content_length=None, chunked=False)
        args.update(kwargs)
        status, reason, headers = args.pop("status"), args.pop("reason"), args.pop("headers")
        with pytest.raises(ValueError):
            serialize_response_head(status, reason, headers, **args)


def test_chunk_and_trailers() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert chunk(b"") == b""  # never a premature last-chunk
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert serialize_trailers([]) == LAST_CHUNK
    assert serialize_trailers([(b"X-Sum", b"1"), (b"Content-Length", b"9"), (b"host", b"x")]) == (
        b"0\r\nX-Sum: 1\r\n\r\n")
    with pytest.raises(ValueError):
        serialize_trailers([(b"X", b"\r\nEvil: 1")])


def test_roundtrip_parse_serialize_parse() -> None:
    data = chunked_req(b"5;a=b\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n", b"Connection: keep-alive")
    p = RequestParser()
    p.feed(data)
    head = p.next_event()
    body = p.next_event()
    end = p.next_event()
    wire = serialize_request_head(head.method, head.target, head.headers,
                                  content_length=head.content_length, chunked=head.chunked)
    wire += chunk(body) + serialize_trailers(end.trailers)
    assert wire == (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n")


# ============================================================================================
# Seed corpus (each file also goes through the fuzz invariant)


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_file(path) -> None:
    """Each seed satisfies the fuzz invariant and gets the verdict in its name (-ok / -<status>)."""
    outcome = check_corpus_file(path)
    verdict = path.stem.rsplit("-", 1)[-1]
    if verdict == "ok":
        assert outcome[0] == "ok", outcome
    else:
        assert outcome[:2] == ("error", int(verdict)), outcome


# ============================================================================================
# parse_whole: the fast path for one complete message in one read. It must never decide
# anything the general path would decide differently: for every input of the tables above, the
# corpus and random mutations of them, it either declines (None, nothing consumed) or returns
# exactly what the general path returns for the same bytes fed whole.

_HEAD_ATTRS = ("method", "target", "path", "query", "version", "headers", "host", "content_length",
               "chunked", "keep_alive", "upgrade", "expect_continue", "connection_tokens")
_RESP_ATTRS = ("status", "reason", "version", "headers", "content_length", "chunked", "keep_alive",
               "connection_tokens")


def _general(parser, data: bytes):
    parser.feed(data)
    events = []
    try:
        while True:
            ev = parser.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                break
            events.append(ev)
    except HTTPError as exc:
        return ("error", exc.status, exc.reason)
    return ("ok", events, parser.trailing)


def _check_request_fast(data: bytes, **kw) -> bool:
    fast = RequestParser(**kw).parse_whole(data)
    if fast is None:
        return False
    ref = _general(RequestParser(**kw), data)
    assert ref[0] == "ok", (data, ref)
    events, trailing = ref[1], ref[2]
    assert len(events) == 2 and isinstance(events[1], EndOfMessage) and not events[1].trailers, data
    assert trailing == b""
    for attr in _HEAD_ATTRS:
        assert getattr(fast, attr) == getattr(events[0], attr), (data, attr)
    return True


def _check_response_fast(data: bytes, method: bytes = b"GET", **kw) -> bool:
    p = ResponseParser(**kw)
    p.set_request_method(method)
    fast = p.parse_whole(data)
    if fast is None:
        assert p.next_event() is NEED_DATA  # nothing consumed
        return False
    assert p.next_event() is PAUSED  # complete
    ref_p = ResponseParser(**kw)
    ref_p.set_request_method(method)
    ref = _general(ref_p, data)
    assert ref[0] == "ok", (data, ref)
    events, trailing = ref[1], ref[2]
    assert isinstance(events[-1], EndOfMessage) and not events[-1].trailers and trailing == b""
    head, body = fast
    for attr in _RESP_ATTRS:
        assert getattr(head, attr) == getattr(events[0], attr), (data, attr)
    assert body == b"".join(e for e in events[1:-1])
    return True


def _all_request_inputs():
    for c in REQUEST_ERRORS:
        yield c[1], {}
    for c in LIMIT_ERRORS:
        yield c[1], c[2]
    for c in REQUEST_OK:
        yield c[1], {}
    for p in corpus_files():
        if not p.name.startswith("resp-"):
            yield p.read_bytes(), {}


def _all_response_inputs():
    for c in RESPONSE_ERRORS:
        yield c[1], [b"GET"]
    for c in RESPONSE_OK:
        yield c[1], c[2]
    for p in corpus_files():
        if p.name.startswith("resp-"):
            yield p.read_bytes(), [b"HEAD" if "-head-" in p.name else b"GET"]


def test_parse_whole_takes_the_common_messages() -> None:
    assert _check_request_fast(GET_WRK)
    assert _check_request_fast(b"GET /a?b=1 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
                               b"User-Agent: u\r\n\r\n")
    nginx = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 15:05:34 GMT\r\n"
             b"Content-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\nhello\n")
    assert _check_response_fast(nginx)
    assert _check_response_fast(b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("data", [
    GET_WRK + GET_WRK,                                    # pipelined: the general path
    GET_WRK[:-2],                                         # incomplete
    b"\r\n" + GET_WRK,                                    # leading empty line
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX_Y: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
])
def test_parse_whole_declines_the_rest(data: bytes) -> None:
    assert RequestParser().parse_whole(data) is None


def test_parse_whole_agrees_with_the_general_path_on_every_table_input() -> None:
    for data, kw in _all_request_inputs():
        _check_request_fast(data, **kw)
    for data, methods in _all_response_inputs():
        for method in methods:
            _check_response_fast(data, method)


def test_parse_whole_agrees_on_mutations() -> None:
    import random
    rnd = random.Random(9112)
    seeds = [d for d, _ in _all_request_inputs()] + [GET_WRK] * 20
    rseeds = [d for d, _ in _all_response_inputs()]
    alphabet = b"\r\n \t:,;_-=\"\x00\x7f\x80\xffaAzZ09/?#@[]HTTP/1.1chunkedContent-LengthHost"
    took = 0
    for _ in range(6000):
        for pool, check in ((seeds, _check_request_fast), (rseeds, _check_response_fast)):
            data = bytearray(rnd.choice(pool))
            for _ in range(rnd.randint(1, 3)):
                i = rnd.randrange(len(data) + 1)
                op = rnd.randrange(3)
                if op == 0 and data:
                    del data[i % len(data)]
                elif op == 1:
                    data[i:i] = bytes([rnd.choice(alphabet)])
                elif data:
                    data[i % len(data)] = rnd.choice(alphabet)
            took += check(bytes(data))
    assert took > 100  # the fast path was exercised, not only declined


# ============================================================================================
# take_body: body bytes straight from the read. Driving a parser with take_body-or-feed must
# give exactly the events of plain feeding, for every way the input is cut into reads.

def _drive_take_body(parser, reads, take=True):
    """Feed ``reads`` one by one, through ``take_body`` first when ``take`` (else plain feed:
    the reference); events with adjacent body bytes merged, or ("error", status)."""
    events = []
    for data in reads:
        body = parser.take_body(data) if take else None
        if body is None:
            parser.feed(data)
        elif body:
            events.append(body)
        try:
            while True:
                ev = parser.next_event()
                if ev is NEED_DATA or ev is PAUSED:
                    break
                events.append(ev)
        except HTTPError as exc:
            return ("error", exc.status)
    return _merge_bytes(events)


def _merge_bytes(events):
    out = []
    for ev in events:
        if isinstance(ev, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += ev
        else:
            out.append(ev)
    return [(type(e).__name__, e if isinstance(e, bytes) else getattr(e, "status", None)) for e in out]


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n" + bytes(range(256)) + b"x" * 44,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"64\r\n" + b"a" * 100 + b"\r\n"
    + b"3;e=1\r\nbcd\r\n0\r\nX-T: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",    # bad chunk end
])
def test_take_body_agrees_with_feed_for_every_cut(data: bytes) -> None:
    ref = _drive_take_body(_get_response_parser(), [data], take=False)
    for a in range(1, len(data), 3):
        for b in (a + 1, a + 7, a + 60, a + 150):
            if b >= len(data):
                continue
            got = _drive_take_body(_get_response_parser(), [data[:a], data[a:b], data[b:]])
            assert got == ref, (a, b)
    assert _drive_take_body(_get_response_parser(), [data[i:i + 1] for i in range(len(data))]) == ref


def _get_response_parser() -> ResponseParser:
    p = ResponseParser()
    p.set_request_method(b"GET")
    return p


def test_take_body_returns_the_read_itself() -> None:
    p = _get_response_parser()
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert isinstance(p.next_event(), ResponseHead)
    assert p.next_event() is NEED_DATA
    read = b"0123456"
    assert p.take_body(read) is read          # no copy
    assert p.take_body(b"789ab") == b"789"    # the rest is buffered for next_event
    assert isinstance(p.next_event(), EndOfMessage)
    assert p.take_body(b"x") is None          # not inside a body


def test_the_core_under_test_is_the_one_asked(core) -> None:
    """The fixture really swaps implementations: the compiled core's classes come from the
    extension modules (and its fast-path splitter is the C one), the reference's from l7."""
    parser = RequestParser()
    if core == "compiled":
        assert type(parser).__module__ == "l7.compiled.h1request"
        assert fuzz_http1.RequestParser is RequestParser
        from l7.compiled import h1grammar
        for helper in (h1grammar.split_fields_fast, h1grammar.scan_request_whole, h1grammar.scan_response_whole):
            assert helper.__module__ == "l7.compiled._h1scan"   # the C scanners, not the Python loops
        assert h1grammar.__file__.endswith(".so")
    else:
        assert type(parser).__module__ == "l7.h1request"
    assert parser.parse_whole(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").host == b"a"


@pytest.mark.parametrize("fields, cl, chunked", [
    ([], None, False),
    ([(b"Host", b"a"), (b"X-Obs", b"\x80\xff v")], 0, False),
    (((b"Host", b"a"),), 12345, False),
    ([(b"Host", b"a"), (b"Accept", b"*/*")], None, True),
    ([(b"Host", b"a")], 2**63 - 1, False),
])
def test_fast_head_serializers_write_what_the_validating_ones_write(fields, cl, chunked) -> None:
    """The proxy's own head serializers (no output validation; C in the compiled core) write
    the same bytes as serialize_request_head / serialize_response_head."""
    assert request_head_bytes(b"POST", b"/p?q=1", fields, cl, chunked) == \
        serialize_request_head(b"POST", b"/p?q=1", fields, content_length=cl, chunked=chunked)
    for status, reason in ((200, b"OK"), (404, b""), (599, b"Odd Reason"), (101, b"Switching")):
        assert response_head_bytes(status, reason, fields, cl, chunked) == \
            serialize_response_head(status, reason, fields, content_length=cl, chunked=chunked)
    # Fields that are not tuples of bytes take the Python path and still come out alike.
    listed = [list(f) for f in fields]
    assert response_head_bytes(200, b"OK", listed, cl, chunked) == \
        serialize_response_head(200, b"OK", fields, content_length=cl, chunked=chunked)
