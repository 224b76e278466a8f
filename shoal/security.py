"""Who may call what: TLS, identities, roles, bearer tokens and per-process limits.

Every gRPC port of every Shoal process goes through one interceptor (``AccessInterceptor``,
``AsyncAccessInterceptor``), which for each call, before anything else runs:

1. finds the method's rule in ``RULES`` (deny by default: a method with no rule is refused to
   everyone, so a new RPC stays closed until someone decides who may call it);
2. authenticates the caller: its TLS client certificate (name = CN, roles = the OU values) and
   / or a bearer token (``authorization: Bearer shoal.<payload>.<hmac>``, signed with the
   cluster's token key); with neither, UNAUTHENTICATED;
3. checks the role (query < write < admin; ``cluster`` is Shoal's own processes and may do
   everything): PERMISSION_DENIED otherwise, logged (at most a few lines a second). The
   method's least role is checked before the request is parsed, so a caller below it is
   refused whatever bytes it sent; a rule that depends on the request (``ByRequest``) is
   checked again on the parsed request;
4. applies the limits: a deadline if required (INVALID_ARGUMENT without one), and at most
   ``max_concurrent_requests`` calls in flight (RESOURCE_EXHAUSTED beyond). Message sizes are
   gRPC's own limit (``max_message_bytes``: RESOURCE_EXHAUSTED).

Without TLS and without a token key, authentication is off (every caller may do everything),
which Shoal allows only on loopback addresses, and says so in the log. Processes install their
security once (``install``); ``server_credentials`` / ``channel_credentials`` and the
interceptors read it.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from shoal.config import SecurityConfig
from shoal.errors import ShoalError

log = logging.getLogger("security")

QUERY, WRITE, ADMIN, CLUSTER = "query", "write", "admin", "cluster"
ROLES = (QUERY, WRITE, ADMIN, CLUSTER)
# What each role may do: every role includes the ones below it.
GRANTS = {QUERY: {QUERY}, WRITE: {QUERY, WRITE}, ADMIN: {QUERY, WRITE, ADMIN},
          CLUSTER: {QUERY, WRITE, ADMIN, CLUSTER}}


@dataclass(frozen=True)
class ByRequest:
    """A rule whose role depends on the request: at least ``least`` (checked before the
    request is parsed, so a caller below it is refused whatever the bytes), then
    ``of(request)`` on the parsed request."""
    least: str
    of: Callable

    def __call__(self, request) -> str:
        return self.of(request)


# Dropping a model version is an admin's act; the other updates a writer's.
_update_model_role = ByRequest(WRITE, lambda r: ADMIN if getattr(r, "drop", False) else WRITE)


C, S, R = "/shoal.v1.Coordinator/", "/shoal.v1.ShardServer/", "/shoal.v1.Router/"
# Method -> the role it needs (or a function of the request that says). Deny by default.
RULES: dict[str, str | ByRequest] = {
    # Coordinator: servers' membership and replication reports; clients' models and admin.
    C + "Register": CLUSTER, C + "Heartbeat": CLUSTER, C + "ReportFailure": CLUSTER,
    C + "ReplicaReady": CLUSTER,
    C + "GetShardMap": QUERY, C + "GetDense": QUERY,
    C + "CreateModel": WRITE, C + "PutDense": WRITE, C + "UpdateModel": _update_model_role,
    C + "SetReplicas": ADMIN, C + "Rebalance": ADMIN, C + "Drain": ADMIN,
    C + "RemoveServer": ADMIN, C + "CancelMoves": ADMIN, C + "SplitTable": ADMIN,
    C + "SetAutoscale": ADMIN, C + "RebalanceExperts": ADMIN,
    # Shard servers: the router's and peers' data paths; a loader ingests and verifies.
    S + "WriteRows": CLUSTER, S + "LookupRows": CLUSTER, S + "LookupPooled": CLUSTER,
    S + "ExpertForward": CLUSTER, S + "BuildReplica": CLUSTER, S + "ReadPartition": CLUSTER,
    S + "Replicate": CLUSTER, S + "CatchUp": CLUSTER, S + "HotIds": CLUSTER,
    S + "Ingest": WRITE, S + "Checksums": WRITE, S + "Stats": QUERY,
    # Router: the clients' API.
    R + "Lookup": QUERY, R + "LookupRows": QUERY, R + "MoeForward": QUERY, R + "Predict": QUERY,
    R + "Status": QUERY,
    R + "GetDense": QUERY,
    R + "CreateModel": WRITE, R + "PutDense": WRITE, R + "WriteRows": WRITE,
    R + "UpdateModel": _update_model_role, R + "RebalanceExperts": ADMIN,
}

TOKEN_PREFIX = "shoal"


class SecurityError(Exception):
    """A security setting that cannot work (a missing file, plaintext off loopback)."""


@dataclass(frozen=True)
class Identity:
    name: str
    roles: frozenset
    via: str                      # "certificate", "token", "certificate+token", "open"

    def may(self, role: str) -> bool:
        return any(role in GRANTS[r] for r in self.roles if r in GRANTS)

    def __str__(self) -> str:
        return f"{self.name} ({self.via}; roles {', '.join(sorted(self.roles)) or 'none'})"


# ------------------------------------------------------------------ tokens
def cluster_id(key: bytes) -> str:
    """A short public name of the cluster a token key belongs to."""
    return hashlib.sha256(b"shoal-cluster-id" + key).hexdigest()[:12]


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def make_token(key: bytes, name: str, roles, ttl_s: float = 365 * 86400.0) -> str:
    """A bearer token for ``name`` with ``roles``, valid for ``ttl_s``, signed with ``key``."""
    bad = set(roles) - set(ROLES)
    if bad or not roles:
        raise ValueError(f"roles: {sorted(bad) or 'none given'}; allowed: {', '.join(ROLES)}")
    payload = json.dumps({"c": cluster_id(key), "n": name, "r": sorted(roles),
                          "e": int(time.time() + ttl_s)}, separators=(",", ":")).encode()
    sig = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{TOKEN_PREFIX}.{_b64(payload)}.{_b64(sig)}"


def verify_token(key: bytes, token: str, now: float | None = None) -> Identity:
    """The identity a token names; ShoalError(UNAUTHENTICATED) saying why if it is not valid
    for this cluster."""
    def refuse(why: str):
        return ShoalError(grpc.StatusCode.UNAUTHENTICATED, f"token: {why}")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise refuse("not a Shoal token (expected shoal.<payload>.<signature>)")
    try:
        payload, sig = _unb64(parts[1]), _unb64(parts[2])
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise refuse("malformed (bad base64 or JSON)") from None
    if not isinstance(claims, dict):
        raise refuse("malformed (payload is not an object)")
    if claims.get("c") != cluster_id(key):
        raise refuse(f"issued by another cluster (cluster id {str(claims.get('c'))[:16]!r}; "
                     f"this cluster is {cluster_id(key)!r})")
    if not hmac.compare_digest(sig, hmac.new(key, payload, hashlib.sha256).digest()):
        raise refuse("signature does not match this cluster's token key")
    exp = claims.get("e")
    if not isinstance(exp, int) or exp < (time.time() if now is None else now):
        raise refuse(f"expired (at {exp})")
    roles = claims.get("r")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise refuse("malformed roles")
    return Identity(str(claims.get("n", "")), frozenset(roles), "token")


# ------------------------------------------------------------------ certificates
_cert_cache: dict[bytes, tuple[str, frozenset]] = {}


def certificate_identity(pem: bytes) -> tuple[str, frozenset]:
    """(CN, roles from the OU values) of a PEM certificate the TLS layer already verified."""
    got = _cert_cache.get(pem)
    if got is None:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
        cert = x509.load_pem_x509_certificate(pem)
        cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        ous = [a.value for a in cert.subject.get_attributes_for_oid(
            NameOID.ORGANIZATIONAL_UNIT_NAME)]
        got = (str(cn[0]) if cn else "", frozenset(str(o) for o in ous if o in ROLES))
        if len(_cert_cache) > 4096:
            _cert_cache.clear()
        _cert_cache[pem] = got
    return got


# ------------------------------------------------------------------ the process's settings
@dataclass
class Installed:
    config: SecurityConfig
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token_key: bytes | None = None
    own_token: str | None = None             # this process's cluster token (outgoing calls)

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def enforced(self) -> bool:
        return self.tls or self.token_key is not None


_installed = Installed(SecurityConfig())


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SecurityError(f"security.{what}: cannot read {path!r}: {e.strerror}") from None


def load(cfg: SecurityConfig) -> Installed:
    files = (cfg.tls_ca_file, cfg.tls_cert_file, cfg.tls_key_file)
    if any(files) and not all(files):
        raise SecurityError("security: tls_ca_file, tls_cert_file and tls_key_file go together "
                            f"(got ca={cfg.tls_ca_file!r}, cert={cfg.tls_cert_file!r}, "
                            f"key={cfg.tls_key_file!r})")
    out = Installed(cfg)
    if all(files):
        out.ca, out.cert, out.key = (_read(cfg.tls_ca_file, "tls_ca_file"),
                                     _read(cfg.tls_cert_file, "tls_cert_file"),
                                     _read(cfg.tls_key_file, "tls_key_file"))
    if cfg.token_key_file:
        out.token_key = bytes.fromhex(_read(cfg.token_key_file, "token_key_file").decode().strip())
        out.own_token = make_token(out.token_key, "shoal-process", [CLUSTER], ttl_s=10 * 365 * 86400)
    return out


def install(cfg: SecurityConfig) -> Installed:
    """Set this process's security (once, at start): its ports and its outgoing calls use it."""
    global _installed
    _installed = load(cfg)
    return _installed


def installed() -> Installed:
    return _installed


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_port(server, host: str, port: int, role: str) -> int:
    """Bind ``server`` to host:port with this process's TLS (mutual TLS: a client certificate
    from the cluster's CA is required, except on a router with ``client_certs`` off, which asks
    for none, so its callers authenticate with a token; gRPC Python cannot ask for an optional
    one); plaintext only on loopback. The bound port."""
    inst = _installed
    if inst.tls:
        require = inst.config.client_certs or role != "router"
        creds = grpc.ssl_server_credentials([(inst.key, inst.cert)], root_certificates=inst.ca,
                                            require_client_auth=require)
        bound = server.add_secure_port(f"{host}:{port}", creds)
        log.info("%s: TLS on %s:%d (%s)", role, host, bound,
                 "client certificates required" if require else
                 "no client certificates asked for: callers authenticate with a token")
    else:
        if not is_loopback(host):
            raise SecurityError(f"security: plaintext gRPC is allowed only on loopback; {role} "
                                f"was asked to listen on {host!r}. Set security.tls_ca_file, "
                                "tls_cert_file and tls_key_file (`shoal certs` makes them)")
        bound = server.add_insecure_port(f"{host}:{port}")
        log.warning("%s: plaintext gRPC on %s:%d (loopback only, no TLS; authentication %s)",
                    role, host, bound, "by token" if inst.enforced else "off")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    return bound


# ------------------------------------------------------------------ outgoing calls
@dataclass(frozen=True)
class Credentials:
    """What a client presents: TLS files (the CA that signs the cluster's certificates, and
    optionally a client certificate and key) and / or a bearer token."""
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None

    @classmethod
    def from_files(cls, ca_file: str = "", cert_file: str = "", key_file: str = "",
                   token: str | None = None) -> "Credentials":
        rd = lambda p, w: _read(p, w) if p else None          # noqa: E731
        return cls(rd(ca_file, "ca_file"), rd(cert_file, "cert_file"), rd(key_file, "key_file"),
                   token)

    def replace(self, **kw) -> "Credentials":
        return dataclasses.replace(self, **kw)


def operator_credentials(cfg: SecurityConfig) -> Credentials | None:
    """Credentials for whoever holds a cluster's own files (a local operator, ``LocalCluster``,
    the CLI): its certificate and key, and a cluster token from its token key."""
    inst = load(cfg)
    if not inst.enforced:
        return None
    return Credentials(inst.ca, inst.cert, inst.key, inst.own_token)


def process_credentials() -> Credentials | None:
    """This process's own credentials for calls to other Shoal processes (None: plaintext)."""
    inst = _installed
    if not inst.tls and inst.own_token is None:
        return None
    return Credentials(inst.ca, inst.cert, inst.key, inst.own_token)


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = list(d.metadata or ()) + [self._md]
        return d._replace(metadata=md) if hasattr(d, "_replace") else _Details(d, md)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.metadata = d.method, d.timeout, metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


class _AioTokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor,
                           grpc.aio.UnaryStreamClientInterceptor,
                           grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = grpc.aio.Metadata(*(tuple(d.metadata or ())), self._md)
        return d._replace(metadata=md)

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def channel(address: str, options, creds: Credentials | None = None) -> grpc.Channel:
    """A synchronous channel to ``address`` with ``creds`` (default: this process's own)."""
    creds = creds if creds is not None else process_credentials()
    if creds is None or creds.ca is None:
        ch = grpc.insecure_channel(address, options=options)
    else:
        ch = grpc.secure_channel(address, grpc.ssl_channel_credentials(creds.ca, creds.key,
                                                                       creds.cert),
                                 options=options)
    if creds is not None and creds.token:
        ch = grpc.intercept_channel(ch, _TokenInterceptor(creds.token))
    return ch


def aio_channel(address: str, options, creds: Credentials | None = None) -> grpc.aio.Channel:
    """``channel`` for asyncio code."""
    creds = creds if creds is not None else process_credentials()
    inter = [_AioTokenInterceptor(creds.token)] if creds is not None and creds.token else None
    if creds is None or creds.ca is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=inter)
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(creds.ca, creds.key,
                                                                         creds.cert),
                                   options=options, interceptors=inter)


# ------------------------------------------------------------------ the interceptors
class _DenialLog:
    """Refusals are logged, at most ``per_s`` lines a second (a flood is not a log flood);
    the number left out is said in the next line."""

    def __init__(self, per_s: float = 5.0):
        self._per_s, self._allow, self._t, self._skipped = per_s, per_s, time.monotonic(), 0
        self._lock = threading.Lock()

    def __call__(self, code: grpc.StatusCode, method: str, peer: str, why: str) -> None:
        from shoal.metrics import RPC_DENIED
        RPC_DENIED.labels(method.rsplit("/", 1)[-1], code.name).inc()
        with self._lock:
            now = time.monotonic()
            self._allow = min(self._per_s, self._allow + (now - self._t) * self._per_s)
            self._t = now
            if self._allow < 1:
                self._skipped += 1
                return
            self._allow -= 1
            skipped, self._skipped = self._skipped, 0
        log.warning("refused %s from %s: %s: %s%s", method, peer, code.name, why,
                    f" ({skipped} more refusals not logged)" if skipped else "")


_denials = _DenialLog()


class Gate:
    """The decision for one call (shared by the sync and asyncio interceptors)."""

    def __init__(self):
        self.in_flight = 0
        self._lock = threading.Lock()

    def identity(self, context) -> Identity:
        inst = _installed
        if not inst.enforced:
            return Identity("anyone", frozenset([CLUSTER]), "open")
        name, roles, via = "", frozenset(), []
        if inst.tls:
            pem = context.auth_context().get("x509_pem_cert")
            if pem:
                name, roles = certificate_identity(pem[0])
                via.append("certificate")
        token = None
        for k, v in context.invocation_metadata() or ():
            if k == "authorization":
                token = v[7:] if isinstance(v, str) and v.startswith("Bearer ") else v
        if token is not None:
            if inst.token_key is None:
                raise ShoalError(grpc.StatusCode.UNAUTHENTICATED,
                                 "token: this cluster accepts no tokens (no security."
                                 "token_key_file); present a client certificate")
            t = verify_token(inst.token_key, str(token))
            name, roles = name or t.name, roles | t.roles
            via.append("token")
        if not via:
            raise ShoalError(grpc.StatusCode.UNAUTHENTICATED,
                             "no credentials: present a client certificate or a bearer token "
                             "(metadata authorization: Bearer shoal....)")
        return Identity(name, roles, "+".join(via))

    def admit(self, method: str, request, context, stream: bool = False) -> None:
        """Raise ShoalError if the call may not run (the caller, its role, the limits, a
        request that did not parse). A ``stream`` of calls (``STREAMS``) is admitted as it
        opens; its handler checks each call's deadline and counts it in flight."""
        rule = RULES.get(method)
        if rule is None:
            raise ShoalError(grpc.StatusCode.PERMISSION_DENIED,
                             f"method {method} is not open to any role (deny by default)")
        who = self.identity(context)
        least = rule.least if isinstance(rule, ByRequest) else rule
        if not who.may(least):                  # before parsing: whatever the bytes
            raise ShoalError(grpc.StatusCode.PERMISSION_DENIED,
                             f"{method.rsplit('/', 1)[-1]} needs role {least!r}; caller {who}")
        _check_parsed(method, request)
        need = rule(request) if isinstance(rule, ByRequest) else rule
        if not who.may(need):
            raise ShoalError(grpc.StatusCode.PERMISSION_DENIED,
                             f"{method.rsplit('/', 1)[-1]} needs role {need!r}; caller {who}")
        cfg = _installed.config
        if cfg.require_deadline and not stream and context.time_remaining() is None:
            raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                             "deadline: none set; this server requires every call to set one "
                             "(security.require_deadline)")

    def start(self, method: str, request, context) -> ShoalError | None:
        """Admit the call and count it in flight (then ``leave``), or the refusal (logged)."""
        try:
            self.admit(method, request, context)
            self.enter()
        except ShoalError as e:
            _refused(e, method, context)
            return e
        return None

    def enter(self) -> None:
        limit = _installed.config.max_concurrent_requests
        with self._lock:
            if limit and self.in_flight >= limit:
                raise ShoalError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"concurrent requests: {self.in_flight} in flight, limit "
                                 f"{limit} (security.max_concurrent_requests); retry later")
            self.in_flight += 1
            n = self.in_flight
        _in_flight_gauge().set(n)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
            n = self.in_flight
        _in_flight_gauge().set(n)


class _Malformed:
    """What a request's bytes parsed to when they are not a valid message."""

    def __init__(self, nbytes: int, error: Exception):
        self.nbytes, self.error = nbytes, error


def _lenient(deserialize):
    """The handler's deserializer, returning ``_Malformed`` instead of raising, so that bytes
    that are no valid message get INVALID_ARGUMENT (gRPC itself would answer INTERNAL)."""
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:          # DecodeError, or a bulk parser's ShoalError
            return _Malformed(len(data), e)
    return parse


def _check_parsed(method: str, request) -> None:
    if isinstance(request, _Malformed):
        err = request.error
        if isinstance(err, ShoalError):
            raise err
        raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"request: {request.nbytes} bytes that are not a valid "
                         f"{method.rsplit('/', 1)[-1]} request ({type(err).__name__}: {err})")


def _in_flight_gauge():
    from shoal import metrics
    return metrics.RPC_IN_FLIGHT.labels(metrics.role())


def _refused(err: ShoalError, method: str, context) -> None:
    if err.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        _denials(err.code, method, context.peer(), err.message)


class AccessInterceptor(grpc.ServerInterceptor):
    """The one place where callers of a threaded gRPC server are admitted or refused."""

    def __init__(self):
        self.gate = Gate()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method, gate = details.method, self.gate
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request, context):
                if (e := gate.start(method, request, context)) is not None:
                    context.abort(e.code, e.message)
                try:
                    return inner(request, context)
                finally:
                    gate.leave()
            return handler._replace(unary_unary=unary,
                                    request_deserializer=_lenient(handler.request_deserializer))
        if handler.unary_stream is not None:
            inner_s = handler.unary_stream

            def stream(request, context):
                if (e := gate.start(method, request, context)) is not None:
                    context.abort(e.code, e.message)
                try:
                    yield from inner_s(request, context)
                finally:
                    gate.leave()
            return handler._replace(unary_stream=stream,
                                    request_deserializer=_lenient(handler.request_deserializer))
        return _deny_streaming(method)


# Bidirectional streams of calls that are open to callers (each call on one is limited like
# an RPC of its own by the stream's handler, through ``current_gate``).
STREAMS = frozenset({R + "PredictStream", R + "MoeForwardStream"})
RULES[R + "PredictStream"] = QUERY
RULES[R + "MoeForwardStream"] = QUERY
_gate: "Gate | None" = None


def current_gate() -> "Gate | None":
    """The gate of this process's asyncio server (None before one is made)."""
    return _gate


class AsyncAccessInterceptor(grpc.aio.ServerInterceptor):
    """``AccessInterceptor`` for asyncio servers (the router, the shard servers)."""

    def __init__(self):
        global _gate
        self.gate = _gate = Gate()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method, gate = details.method, self.gate
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                if (e := gate.start(method, request, context)) is not None:
                    await context.abort(e.code, e.message)
                try:
                    return await inner(request, context)
                finally:
                    gate.leave()
            return handler._replace(unary_unary=unary,
                                    request_deserializer=_lenient(handler.request_deserializer))
        if handler.unary_stream is not None:
            inner_s = handler.unary_stream

            async def stream(request, context):
                if (e := gate.start(method, request, context)) is not None:
                    await context.abort(e.code, e.message)
                try:
                    out = inner_s(request, context)
                    if hasattr(out, "__aiter__"):
                        async for item in out:
                            yield item
                    else:                      # a sync generator run by grpc.aio
                        for item in out:
                            yield item
                finally:
                    gate.leave()
            return handler._replace(unary_stream=stream,
                                    request_deserializer=_lenient(handler.request_deserializer))
        if handler.stream_stream is not None and method in STREAMS:
            inner_ss = handler.stream_stream

            async def calls(request_iterator, context):
                try:
                    gate.admit(method, None, context, stream=True)
                except ShoalError as e:
                    _refused(e, method, context)
                    await context.abort(e.code, e.message)
                async for item in inner_ss(request_iterator, context):
                    yield item
            return handler._replace(stream_stream=calls)
        return _deny_streaming(method)


def _deny_streaming(method: str):
    def deny(request_iterator, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED,
                      f"method {method}: client-streaming calls are not open to any role")
    return grpc.stream_unary_rpc_method_handler(deny)
