"""A student at a JupyterHub, as a browser is: log in with a password, start the
server, open a kernel and run cells over the Jupyter Server REST and websocket
APIs. Used by the classroom's tests and its load benchmark; loopback only.
"""

from __future__ import annotations

import http.cookiejar
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field


class HubError(Exception):
    pass


@dataclass
class CellResult:
    status: str
    outputs: list[dict] = field(default_factory=list)
    first_output_s: float | None = None
    seconds: float = 0.0

    @property
    def text(self) -> str:
        parts = []
        for o in self.outputs:
            c = o["content"]
            parts.append(c.get("text") or c.get("data", {}).get("text/plain") or c.get("evalue") or "")
        return "".join(parts)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class HubStudent:
    """One student's session at the hub on ``base`` (http://127.0.0.1:PORT)."""

    def __init__(self, base: str, name: str, password: str, timeout: float = 120.0) -> None:
        self.base, self.name, self.password, self.timeout = base.rstrip("/"), name, password, timeout
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        # The login form answers with a redirect that would start the server
        # (and wait for it): the client starts it itself, through the API.
        self._no_redirect = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar),
                                                        _NoRedirect())
        self.token: str | None = None

    # -- plain HTTP

    def _xsrf(self) -> str:
        return next((c.value for c in self.jar if c.name == "_xsrf"), "")

    def request(self, method: str, path: str, body: dict | None = None, form: dict | None = None,
                timeout: float | None = None, follow: bool = True) -> tuple[int, bytes]:
        headers = {}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"token {self.token}"
        elif self._xsrf():
            headers["X-XSRFToken"] = self._xsrf()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with (self.opener if follow else self._no_redirect).open(req, timeout=timeout or self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def api(self, method: str, path: str, body: dict | None = None, ok=(200, 201, 202, 204)):
        code, data = self.request(method, path, body)
        if code not in ok:
            raise HubError(f"{method} {path}: HTTP {code}: {data[:300]!r}")
        return json.loads(data) if data else None

    # -- the hub

    def login(self) -> None:
        """The login form with the Unix password (PAM), then an API token of one's own."""
        self.request("GET", "/hub/login")
        code, body = self.request("POST", "/hub/login?next=", form={
            "username": self.name, "password": self.password, "_xsrf": self._xsrf()}, follow=False)
        if not any(c.name.startswith("jupyterhub-session-id") or c.name == "jupyterhub-hub-login"
                   for c in self.jar) or code >= 400:
            raise HubError(f"{self.name} could not log in: HTTP {code}: {body[:200]!r}")
        reply = self.api("POST", f"/hub/api/users/{self.name}/tokens",
                         {"note": "smolvm classroom client", "expires_in": 7200})
        self.token = reply["token"]

    def start_server(self) -> float:
        """Start this student's JupyterLab server; seconds until it answers."""
        t0 = time.monotonic()
        self.api("POST", f"/hub/api/users/{self.name}/server", ok=(201, 202, 400))
        deadline = t0 + self.timeout
        while time.monotonic() < deadline:
            user = self.api("GET", f"/hub/api/users/{self.name}")
            server = (user.get("servers") or {}).get("")
            if server and server.get("ready"):
                return time.monotonic() - t0
            time.sleep(0.3)
        raise HubError(f"{self.name}'s server did not start in {self.timeout:.0f} s")

    def stop_server(self) -> None:
        self.api("DELETE", f"/hub/api/users/{self.name}/server", ok=(202, 204, 400))

    # -- the student's own server

    @property
    def server_path(self) -> str:
        return f"/user/{self.name}"

    def server(self, method: str, path: str, body: dict | None = None, ok=(200, 201, 202, 204)):
        return self.api(method, f"{self.server_path}{path}", body, ok)

    def start_kernel(self, name: str = "smolvm-python") -> str:
        return self.server("POST", "/api/kernels", {"name": name})["id"]

    def open_kernel(self, kernel_id: str) -> KernelSocket:
        return KernelSocket(self, kernel_id)

    def run_cell(self, kernel_id: str, code: str, timeout: float = 180.0) -> CellResult:
        """One cell on its own websocket (blocking; not from inside an event loop)."""
        import asyncio

        async def go():
            ks = self.open_kernel(kernel_id)
            await ks.connect()
            try:
                return await ks.execute(code, timeout=timeout)
            finally:
                ks.close()
        return asyncio.run(go())

    def interrupt_cell(self, kernel_id: str, code: str = "while True: pass", after: float = 2.0) -> CellResult:
        """Run ``code``, interrupt it through the server's REST API after ``after`` s."""
        import asyncio

        async def go():
            ks = self.open_kernel(kernel_id)
            await ks.connect()
            try:
                cell = asyncio.create_task(ks.execute(code, timeout=120))
                await asyncio.sleep(after)
                await asyncio.to_thread(self.server, "POST", f"/api/kernels/{kernel_id}/interrupt")
                return await cell
            finally:
                ks.close()
        return asyncio.run(go())


class ServerUser(HubStudent):
    """The same client for a plain Jupyter Server (or a gateway) with a token."""

    def __init__(self, base: str, token: str, timeout: float = 120.0) -> None:
        super().__init__(base, "user", "", timeout)
        self.token = token

    @property
    def server_path(self) -> str:
        return ""

    @classmethod
    def start(cls, folder, env: dict, timeout: float = 180.0) -> tuple[ServerUser, object]:
        """A Jupyter Server on a free loopback port with a random token, its root and
        log (server.log) in ``folder``; returns the client and the process once it answers."""
        import os
        import secrets
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        token = secrets.token_hex(16)
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
             *(["--allow-root"] if os.geteuid() == 0 else [])],
            env=env, stdout=open(f"{folder}/server.log", "wb"), stderr=subprocess.STDOUT, cwd=folder)
        user = cls(f"http://127.0.0.1:{port}", token, timeout)
        deadline = time.monotonic() + 60
        while True:
            try:
                if user.request("GET", "/api/status")[0] == 200:
                    return user, proc
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                with open(f"{folder}/server.log", errors="replace") as fh:
                    raise HubError("the Jupyter Server did not come up: " + fh.read()[-3000:])
            time.sleep(0.5)


class KernelSocket:
    """The kernel's websocket, as JupyterLab opens it (messages as JSON)."""

    def __init__(self, student: HubStudent, kernel_id: str) -> None:
        self.student, self.kernel_id = student, kernel_id
        self.session = uuid.uuid4().hex
        self.ws = None

    async def connect(self) -> None:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        s = self.student
        url = (s.base.replace("http", "ws", 1) + f"{s.server_path}/api/kernels/{self.kernel_id}/channels"
               f"?session_id={self.session}")
        self.ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {s.token}"},
                                                      request_timeout=s.timeout), max_message_size=64 << 20)

    def _msg(self, msg_type: str, content: dict, channel: str = "shell") -> dict:
        return {"header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": self.student.name,
                           "session": self.session, "date": "", "version": "5.3"},
                "parent_header": {}, "metadata": {}, "content": content, "channel": channel, "buffers": []}

    async def execute(self, code: str, timeout: float = 300.0) -> CellResult:
        """Run one cell; its outputs, the first output's and the whole cell's time."""
        import asyncio

        msg = self._msg("execute_request", {"code": code, "silent": False, "store_history": True,
                                            "user_expressions": {}, "allow_stdin": False,
                                            "stop_on_error": True})
        t0 = time.monotonic()
        await self.ws.write_message(json.dumps(msg))
        result = CellResult(status="?")
        got_reply = got_idle = False
        deadline = t0 + timeout
        while not (got_reply and got_idle):
            raw = await asyncio.wait_for(self.ws.read_message(), max(0.1, deadline - time.monotonic()))
            if raw is None:
                raise HubError("the kernel's websocket closed")
            m = json.loads(raw)
            if m.get("parent_header", {}).get("msg_id") != msg["header"]["msg_id"]:
                continue
            mtype = m["msg_type"]
            if m["channel"] == "shell" and mtype == "execute_reply":
                result.status = m["content"].get("status", "?")
                got_reply = True
            elif mtype == "status":
                got_idle = got_idle or m["content"].get("execution_state") == "idle"
            elif mtype in ("stream", "execute_result", "display_data", "error"):
                if result.first_output_s is None:
                    result.first_output_s = time.monotonic() - t0
                result.outputs.append(m)
        result.seconds = time.monotonic() - t0
        return result

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
