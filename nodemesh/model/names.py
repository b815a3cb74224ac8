"""Syntax of names used across the API: DNS names, IANA service names, header names, CIDRs.

Each ``check_*`` function returns a problem (a message fragment) or None, so it can serve as a
`Str.validator` in a schema and also be called directly.
"""

from __future__ import annotations

import ipaddress
import re

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_IANA_SVC = re.compile(r"[-a-z0-9]+")
# RFC 7230 token characters, as the Gateway API's HeaderName pattern.
_HTTP_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")

DNS1123_LABEL_MSG = ("must be a DNS-1123 label: at most 63 characters of lowercase letters, "
                     "digits and '-', starting and ending with a letter or digit")
DNS1123_SUBDOMAIN_MSG = ("must be a DNS-1123 subdomain: at most 253 characters of lowercase "
                         "letters, digits, '-' and '.', each dot-separated part starting and "
                         "ending with a letter or digit")
DNS1035_LABEL_MSG = ("must be a DNS-1035 label: at most 63 characters of lowercase letters, "
                     "digits and '-', starting with a letter and ending with a letter or digit")
IANA_SVC_NAME_MSG = ("must be an IANA service name: at most 15 characters of lowercase letters, "
                     "digits and '-', with at least one letter, no '--', and not starting or "
                     "ending with '-'")


def check_dns1123_label(value: str) -> str | None:
    if len(value) > 63 or not _DNS1123_LABEL.fullmatch(value):
        return DNS1123_LABEL_MSG
    return None


def check_dns1123_subdomain(value: str) -> str | None:
    if len(value) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(value):
        return DNS1123_SUBDOMAIN_MSG
    return None


def check_dns1035_label(value: str) -> str | None:
    if len(value) > 63 or not _DNS1035_LABEL.fullmatch(value):
        return DNS1035_LABEL_MSG
    return None


def check_iana_svc_name(value: str) -> str | None:
    if (
        len(value) > 15
        or not _IANA_SVC.fullmatch(value)
        or not re.search(r"[a-z]", value)
        or "--" in value
        or value.startswith("-")
        or value.endswith("-")
    ):
        return IANA_SVC_NAME_MSG
    return None


def is_iana_svc_name(value: str) -> bool:
    return check_iana_svc_name(value) is None


def check_http_header_name(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if len(value) > 256 or not _HTTP_TOKEN.fullmatch(value):
        return ("must be an HTTP header name: at most 256 letters, digits and "
                "!#$%&'*+-.^_`|~ (no spaces or ':')")
    return None


def parse_cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A CIDR as Kubernetes reads it: host bits may be set (``10.0.0.1/24`` is 10.0.0.0/24)."""
    if "/" not in value:
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def check_cidr(value: str) -> str | None:
    if parse_cidr(value) is None:
        return f'must be a CIDR such as "10.0.0.0/8" (got "{value}")'
    return None


def check_ip(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f'must be an IP address (got "{value}")'
    return None


def check_cidr_or_ip(value: str) -> str | None:
    """Cilium's fromCIDR/toCIDR take a prefix or a single address."""
    if parse_cidr(value) is not None or check_ip(value) is None:
        return None
    return f'must be a CIDR such as "10.0.0.0/8" or an IP address (got "{value}")'
