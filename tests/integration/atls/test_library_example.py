"""The library example in ``enclavekit.atls.__doc__`` runs as written (the demo helper builds on it)."""

from __future__ import annotations

import http.server
import textwrap
import threading
from pathlib import Path

import enclavekit.atls


def test_package_docstring_example_runs(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("hi\n")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    namespace: dict[str, object] = {
        "app_port": app.server_address[1],
        "state_dir": tmp_path / "ca",
        "pcrs": {0: b"\x01" * 48, 1: b"\x02" * 48, 2: b"\x03" * 48},
    }
    code = textwrap.dedent(enclavekit.atls.__doc__.split("::\n", 1)[1])  # type: ignore[union-attr]
    try:
        exec(compile(code, "enclavekit.atls.__doc__", "exec"), namespace)
        response = namespace["response"]
        assert response.status_code == 200  # type: ignore[attr-defined]
        assert response.content == b"hi\n"  # type: ignore[attr-defined]
        assert namespace["peer"].fresh is not None  # type: ignore[attr-defined]
    finally:
        for name in ("proxy", "ca", "identity"):
            if name in namespace:
                namespace[name].stop()  # type: ignore[attr-defined]
        if "identity" in namespace:
            namespace["identity"].ca.close()  # type: ignore[attr-defined]
        if "issuer" in namespace:
            namespace["issuer"].store.close()  # type: ignore[attr-defined]
        app.shutdown()
        app.server_close()
