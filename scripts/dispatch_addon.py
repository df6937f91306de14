"""Bare mitmdump with the sidecar's hook dispatch (addon/proxy/dispatch.py) and nothing else, for
scripts/bench.py: what that change alone does to mitmproxy, beside the sidecar that carries it."""

from __future__ import annotations

from durable_sidecar.proxy import dispatch


class Dispatch:
    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        if not dispatch.install():
            raise RuntimeError("this mitmproxy's addon manager is not the one addon/proxy/dispatch.py expects")


addons = [Dispatch()]
