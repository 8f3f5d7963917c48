"""Calling the API as a user: the bearer header, signing up, uploading an image."""

from __future__ import annotations

from falcon import testing


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sign_up(client: testing.TestClient, token: str, **profile) -> tuple[dict[str, str], dict]:
    """POST /api/users/initialize as the token's subject (a new user, so 201 is required);
    returns the headers to act as that user and the user as the API shows it."""
    headers = bearer(token)
    result = client.simulate_post("/api/users/initialize", headers=headers, json=profile or None)
    assert result.status_code == 201, result.text
    return headers, result.json["user"]


def upload_image(client: testing.TestClient, headers: dict[str, str], data: bytes,
                 content_type: str = "image/png") -> str:
    """POST the bytes to /api/uploads as a raw body (201 required); returns the upload id."""
    result = client.simulate_post("/api/uploads", headers={**headers, "Content-Type": content_type}, body=data)
    assert result.status_code == 201, result.text
    return result.json["upload"]["id"]
