"""Local ServiceAccount-shaped tokens: the controller accepts only its own,
for audience synchro-ca, unexpired, naming a ServiceAccount."""

from __future__ import annotations

import datetime as dt

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.tokens import Caller, LocalTokens, TokenInvalid, caller_from_username


def test_round_trip_gives_the_service_account() -> None:
    tokens = LocalTokens()
    assert tokens.authenticate(tokens.mint("shop", "frontend", pod="frontend-0")) == Caller(
        "shop", "frontend", "frontend-0"
    )


def test_wrong_audience_signature_expiry_and_garbage_are_rejected() -> None:
    tokens = LocalTokens()
    with pytest.raises(TokenInvalid, match="audience"):
        tokens.authenticate(tokens.mint("shop", "frontend", audience="kubernetes"))
    forger = LocalTokens(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(TokenInvalid, match="Signature"):
        tokens.authenticate(forger.mint("shop", "frontend"))
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    with pytest.raises(TokenInvalid, match="expired"):
        tokens.authenticate(tokens.mint("shop", "frontend", now=old, ttl=dt.timedelta(hours=1)))
    with pytest.raises(TokenInvalid):
        tokens.authenticate("not.a.token")
    # an unsigned token ("alg": "none") must not pass
    unsigned = jwt.encode(
        {"sub": "system:serviceaccount:shop:frontend", "aud": "synchro-ca"}, None, algorithm="none"
    )
    with pytest.raises(TokenInvalid):
        tokens.authenticate(unsigned)


def test_username_must_be_a_service_account() -> None:
    with pytest.raises(TokenInvalid, match="not a ServiceAccount"):
        caller_from_username("alice")
    with pytest.raises(TokenInvalid):
        caller_from_username("system:serviceaccount:shop")
