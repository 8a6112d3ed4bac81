"""A hospital identity provider on loopback for tests: its JWKS (stoppable, restartable, counting its
fetches) and, for browser sign-in, the authorization-code flow with PKCE (an /authorize that signs the
configured person in at once and a /token that checks the code verifier and returns a signed JWT)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.server import free_port


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Jwks:
    """The identity provider's endpoints on 127.0.0.1 (``url`` is its JWKS)."""

    def __init__(self):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/jwks"
        self.keys: list[dict] = []
        self.fetches = 0
        self.server: ThreadingHTTPServer | None = None

    def publish(self, key, kid: str, alg: str) -> None:
        algo = RSAAlgorithm if alg.startswith("RS") else ECAlgorithm
        self.keys.append({**algo.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig", "alg": alg})

    def handle_get(self, path: str, query: dict) -> tuple[int, dict, bytes]:
        self.fetches += 1
        return 200, {"content-type": "application/json"}, json.dumps({"keys": self.keys}).encode()

    def handle_post(self, path: str, form: dict) -> tuple[int, dict, bytes]:
        return 404, {}, b""

    def start(self) -> None:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, headers: dict, body: bytes) -> None:
                self.send_response(status)
                for k, v in {**headers, "content-length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urlsplit(self.path)
                self._send(*idp.handle_get(url.path, parse_qs(url.query)))

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                self._send(*idp.handle_post(urlsplit(self.path).path, form))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class IdentityProvider(Jwks):
    """Jwks plus /authorize and /token: whoever comes to /authorize is ``person`` with ``roles``."""

    def __init__(self, key, *, issuer: str, client_id: str, person: str, roles: list[str]):
        super().__init__()
        self.key, self.issuer, self.client_id, self.person, self.roles = key, issuer, client_id, person, roles
        self.publish(key, "login", "RS256")
        self.authorize_url, self.token_url = f"{self.base}/authorize", f"{self.base}/token"
        self.codes: dict[str, dict] = {}
        self.refusals: list[str] = []

    def handle_get(self, path: str, query: dict) -> tuple[int, dict, bytes]:
        if path != "/authorize":
            return super().handle_get(path, query)
        q = {k: v[0] for k, v in query.items()}
        if q.get("client_id") != self.client_id or q.get("code_challenge_method") != "S256":
            self.refusals.append(f"authorize: {q}")
            return 400, {}, b"bad authorization request"
        code = secrets.token_urlsafe(16)
        self.codes[code] = q
        target = f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q.get('state', '')})}"
        return 302, {"location": target}, b""

    def handle_post(self, path: str, form: dict) -> tuple[int, dict, bytes]:
        cors = {"access-control-allow-origin": "*", "content-type": "application/json"}
        f = {k: v[0] for k, v in form.items()}
        asked = self.codes.pop(f.get("code", ""), None)
        verifier = f.get("code_verifier", "")
        if (
            path != "/token"
            or asked is None
            or f.get("grant_type") != "authorization_code"
            or f.get("redirect_uri") != asked["redirect_uri"]
            or b64(hashlib.sha256(verifier.encode()).digest()) != asked["code_challenge"]
        ):
            self.refusals.append(f"token: {f}")
            return 400, cors, json.dumps({"error": "invalid_grant"}).encode()
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.client_id,
            "sub": f"sub-{self.person}",
            "preferred_username": self.person,
            "roles": self.roles,
            "iat": now,
            "exp": now + 600,
        }
        token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "login"})
        body = {"id_token": token, "access_token": token, "token_type": "Bearer", "expires_in": 600}
        return 200, cors, json.dumps(body).encode()
