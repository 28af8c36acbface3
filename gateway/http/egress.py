"""Which forward proxy, if any, connections to an upstream go through: pure decisions, no I/O.

The environment is read the way curl, requests and httpx read it:

- `https_proxy` / `HTTPS_PROXY` for https upstreams, `http_proxy` / `HTTP_PROXY` for http ones.
  `ALL_PROXY` is not read. The lowercase name wins when it is set at all; set but empty, it means
  "no proxy" even if the uppercase one is set (as Python's urllib does).
- `no_proxy` / `NO_PROXY` (same precedence): a comma-separated list of `*` (every host), host
  names (`example.com` matches it and its subdomains; a leading `.` or `*.` means the same),
  IP addresses and CIDR blocks (matched against IP-literal upstream hosts only; names are not
  resolved), each optionally with `:port` (`[::1]:8080` for IPv6). Entries that parse as none
  of these never match.
- A proxy URL is `http://[user:password@]host[:port]` (port 80 by default, `http://` may be left
  out). Credentials become `Proxy-Authorization: Basic`. TLS to the proxy itself (`https://`) and
  SOCKS are not supported: such a value is a configuration error, not silently ignored.

An upstream's own `proxy` setting overrides the environment: `none` connects directly, a URL
always uses that proxy (NO_PROXY does not apply to it).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

# The per-upstream `proxy` value that turns proxying off for that upstream.
DIRECT = "none"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """A forward proxy: where to connect, and the credentials to present."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        """The proxy's URL without credentials (safe to log)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def authorization(self) -> bytes | None:
        """The Proxy-Authorization value (Basic), or None without credentials."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return b"Basic " + base64.b64encode(pair)


def redact(text: str) -> str:
    """A proxy URL with its credentials hidden, for error messages."""
    scheme, sep, rest = text.rpartition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    return f"{scheme}{sep}***@{hostpart}" if at else text


def parse_proxy_url(text: str) -> ProxyConfig:
    """Parse `http://[user:password@]host[:port]`; raise ValueError saying what is wrong."""
    value = text.strip()
    if not value:
        raise ValueError("is empty; give http://[user:password@]host:port")
    if "://" not in value:
        value = "http://" + value  # `proxy:3128`, as curl and requests accept
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{redact(text)!r} is not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme != "http":
        raise ValueError(
            f"{redact(text)!r}: {scheme}:// proxies are not supported; give http://[user:password@]host:port"
        )
    if not parts.hostname:
        raise ValueError(f"{redact(text)!r} has no host; give http://[user:password@]host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{redact(text)!r} has a path or query; give only http://host:port")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return ProxyConfig(parts.hostname, port or 80, username, password)


@dataclass(frozen=True, slots=True)
class _Rule:
    """One NO_PROXY entry: a domain (and its subdomains) or an IP network, optionally one port."""

    domain: str | None
    network: IPNetwork | None
    port: int | None


@dataclass(frozen=True, slots=True)
class NoProxy:
    """Parsed NO_PROXY: hosts that are reached directly."""

    everything: bool
    rules: tuple[_Rule, ...]

    def bypasses(self, host: str, port: int) -> bool:
        """True if `host:port` is reached without the proxy."""
        if self.everything:
            return True
        host = host.strip("[]").rstrip(".").lower()
        address = _ip(host)
        for rule in self.rules:
            if rule.port is not None and rule.port != port:
                continue
            if rule.network is not None:
                if address is not None and address.version == rule.network.version:
                    if address in rule.network:
                        return True
            elif rule.domain is not None and (host == rule.domain or host.endswith("." + rule.domain)):
                return True
        return False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _split_port(entry: str) -> tuple[str, int | None] | None:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address/CIDR; None if malformed."""
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket:
            return None
        if not rest:
            return host, None
        if not rest.startswith(":") or not rest[1:].isdigit():
            return None
        return host, int(rest[1:])
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return (host, int(port)) if port.isdigit() else None
    return entry, None  # no colon, or a bare IPv6 address (which has several)


def _parse_rule(entry: str) -> _Rule | None:
    split = _split_port(entry)
    if split is None:
        return None
    host, port = split
    if "/" in host:
        try:
            return _Rule(None, ipaddress.ip_network(host, strict=False), port)
        except ValueError:
            return None
    address = _ip(host)
    if address is not None:
        return _Rule(None, ipaddress.ip_network(address), port)
    domain = host.removeprefix("*").lstrip(".").rstrip(".")
    return _Rule(domain, None, port) if domain else None


def parse_no_proxy(text: str) -> NoProxy:
    """Parse a NO_PROXY value (see the module docstring)."""
    entries = [e.strip().lower() for e in text.split(",")]
    entries = [e for e in entries if e]
    if "*" in entries:
        return NoProxy(True, ())
    rules = tuple(r for r in map(_parse_rule, entries) if r is not None)
    return NoProxy(False, rules)


def env_value(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """The (variable, value) of a lowercase `name` or its uppercase form; lowercase wins."""
    for key in (name, name.upper()):
        if key in env:
            return key, env[key]
    return None


def select_proxy(url: str, setting: str | None, env: Mapping[str, str]) -> ProxyConfig | None:
    """The proxy for upstream `url`, or None to connect directly.

    `setting` is the upstream's own `proxy` value: None follows the environment, DIRECT
    connects directly, anything else is a proxy URL. Raises ValueError naming the variable or
    setting that is invalid.
    """
    if setting is not None:
        if setting.strip().lower() == DIRECT:
            return None
        return parse_proxy_url(setting)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    found = env_value(env, f"{scheme}_proxy")
    if found is None or not found[1].strip():
        return None
    name, value = found
    try:
        proxy = parse_proxy_url(value)
    except ValueError as exc:
        raise ValueError(f"{name} {exc}") from None
    no_proxy = env_value(env, "no_proxy")
    if no_proxy is not None and parts.hostname:
        port = parts.port or (443 if scheme == "https" else 80)
        if parse_no_proxy(no_proxy[1]).bypasses(parts.hostname, port):
            return None
    return proxy
