"""Who is asking for a certificate: ServiceAccount tokens, checked two ways.

In Kubernetes the API server says, through a TokenReview with audience
`synchro-ca`; without Kubernetes (`synchro up`, tests) the local runtime mints
tokens with a key only the controller holds, and the controller checks them
with pyjwt. Both give the same `Caller`, so enrollment has one code path.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

AUDIENCE = "synchro-ca"
ISSUER = "synchro-local"
SA_PREFIX = "system:serviceaccount:"


class TokenInvalid(Exception):
    """Wrong audience, bad signature, expired, or not a ServiceAccount."""


@dataclass(frozen=True, slots=True)
class Caller:
    namespace: str
    service_account: str
    pod: str = ""


class Authenticator(Protocol):
    def authenticate(self, token: str) -> Caller: ...


def caller_from_username(username: str, pod: str = "") -> Caller:
    if not username.startswith(SA_PREFIX):
        raise TokenInvalid(f"{username!r} is not a ServiceAccount")
    parts = username[len(SA_PREFIX) :].split(":")
    if len(parts) != 2 or not all(parts):
        raise TokenInvalid(f"{username!r} is not system:serviceaccount:<namespace>:<name>")
    return Caller(parts[0], parts[1], pod)


class LocalTokens:
    """Mints and checks ES256 tokens shaped like projected ServiceAccount tokens."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self.key = key or ec.generate_private_key(ec.SECP256R1())

    def mint(
        self,
        namespace: str,
        service_account: str,
        *,
        pod: str = "",
        audience: str = AUDIENCE,
        ttl: dt.timedelta = dt.timedelta(hours=12),
        now: dt.datetime | None = None,
    ) -> str:
        now = now or dt.datetime.now(dt.UTC)
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": f"{SA_PREFIX}{namespace}:{service_account}",
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account},
                "pod": {"name": pod},
            },
        }
        return jwt.encode(claims, self.key, algorithm="ES256")

    def authenticate(self, token: str) -> Caller:
        try:
            claims = jwt.decode(
                token,
                self.key.public_key(),
                algorithms=["ES256"],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "aud", "sub", "iss"]},
            )
        except jwt.InvalidAudienceError:
            raise TokenInvalid(f"token audience is not {AUDIENCE}") from None
        except jwt.ExpiredSignatureError:
            raise TokenInvalid("token has expired") from None
        except jwt.PyJWTError as exc:
            raise TokenInvalid(f"token rejected: {exc}") from None
        pod = claims.get("kubernetes.io", {}).get("pod", {}).get("name", "")
        return caller_from_username(str(claims["sub"]), pod)


class TokenReviewer:
    """Asks the Kubernetes API server (TokenReview, audience synchro-ca)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._api = client.AuthenticationV1Api(api_client)
        self._client = client

    def authenticate(self, token: str) -> Caller:
        review = self._client.V1TokenReview(
            spec=self._client.V1TokenReviewSpec(token=token, audiences=[AUDIENCE])
        )
        result = self._api.create_token_review(review)
        status = result.status
        if not status or not status.authenticated:
            raise TokenInvalid(f"TokenReview refused the token: {getattr(status, 'error', '')}")
        if AUDIENCE not in (status.audiences or []):
            raise TokenInvalid(f"token audience is not {AUDIENCE}")
        user = status.user
        if user is None or not user.username:
            raise TokenInvalid("TokenReview returned no user")
        pod = ((user.extra or {}).get("authentication.kubernetes.io/pod-name") or [""])[0]
        return caller_from_username(user.username, pod)
