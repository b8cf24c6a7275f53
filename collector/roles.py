"""Who may call what, under mTLS: the role in the peer certificate (collector/certs.py)
decides, on every RPC, before the method runs.

    sensor   loupe.v1.Ingest     (send records)
    analyst  loupe.v1.Observer   (read records)
    admin    both

Health checks and reflection stay open to every certificate the CA signed: they reveal
nothing stored, and monitoring needs them. Any other service is refused to everyone
until it is given roles here (fail closed). A certificate without a role was issued
before roles existed; it is refused with a message saying to re-issue it, because
letting it through would let it do everything.

Without mTLS (a loopback or --insecure collector) there are no certificates and no
roles: everything is allowed, as before.
"""

from __future__ import annotations

import functools
import inspect

import grpc
from cryptography import x509

from collector import certs

# gRPC service -> the roles that may call its methods.
ALLOWED: dict[str, frozenset[str]] = {
    "loupe.v1.Ingest": frozenset({certs.SENSOR, certs.ADMIN}),
    "loupe.v1.Observer": frozenset({certs.ANALYST, certs.ADMIN}),
}
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")


@functools.lru_cache(maxsize=256)
def _role_of_pem(pem: bytes) -> tuple[str, str | None]:
    """(common name, role) of a PEM certificate. Cached: a sensor reconnecting presents
    the same certificate each time."""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return (str(names[0].value) if names else "?"), certs.role_of(cert)


def refusal(service: str, auth: dict) -> str | None:
    """Why this peer may not call `service`, or None when it may."""
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return "no client certificate"
    name, role = _role_of_pem(pems[0])
    allowed = ALLOWED.get(service, frozenset())
    if role is None:
        return (f"certificate {name!r} carries no Loupe role (it predates roles): re-issue it "
                "with `loupe certs init` (--sensor, --analyst or --admin)")
    if role in allowed:
        return None
    what = {"loupe.v1.Ingest": "send records", "loupe.v1.Observer": "read records"}
    needs = " or ".join(sorted(allowed)) or "no role"
    return (f"certificate {name!r} has role {role}, which may not {what.get(service, 'call ' + service)}"
            f" (needs {needs})")


class RoleInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every loupe.v1 method handler with the role check; PERMISSION_DENIED with
    the reason when it fails."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        service = details.method.lstrip("/").rpartition("/")[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        return _guarded(handler, service)


async def _check(context, service: str) -> None:
    reason = refusal(service, context.auth_context())
    if reason is not None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)


def _guarded(handler: grpc.RpcMethodHandler, service: str) -> grpc.RpcMethodHandler:
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    behaviour = getattr(handler, attr)
    if inspect.isasyncgenfunction(behaviour):
        async def guarded(request, context):
            await _check(context, service)
            async for response in behaviour(request, context):
                yield response
    else:
        # A coroutine (which may write its responses with context.write).
        async def guarded(request, context):
            await _check(context, service)
            return await behaviour(request, context)
    return make(guarded, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
