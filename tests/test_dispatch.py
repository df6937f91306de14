"""The sidecar's hook dispatch (addon/proxy/dispatch.py) calls exactly what mitmproxy's own does, in the
same order, with the same error handling and AddonHalt; it only skips addons that have no handler."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import exceptions
from mitmproxy.addonmanager import AddonManager
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow

from durable_sidecar.proxy import dispatch


class Records:
    def __init__(self, calls: list[str], name: str) -> None:
        self.calls, self.name = calls, name

    def request(self, flow) -> None:
        self.calls.append(self.name)


class Quiet:
    """No handler at all: what most of mitmdump's ~60 addons are for any one hook."""

    def __init__(self, name: str) -> None:
        self.name = name  # mitmproxy's addon manager wants a unique name per addon


class Parent:
    def __init__(self, calls: list[str]) -> None:
        self.addons = [Quiet("quiet child"), Records(calls, "child")]


class Async:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    async def request(self, flow) -> None:
        await asyncio.sleep(0)
        self.calls.append("async")


class Broken:
    def request(self, flow) -> None:
        raise ValueError("boom")


class Halts:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def request(self, flow) -> None:
        self.calls.append("halt")
        raise exceptions.AddonHalt


def test_the_fast_dispatch_calls_what_mitmproxys_own_calls(caplog: pytest.LogCaptureFixture) -> None:
    assert dispatch.install()
    fast = AddonManager.trigger_event
    own = fast.__wrapped__  # mitmproxy's, as the sidecar found it
    assert fast is not own
    calls: list[str] = []
    seen: dict[str, tuple[list[str], list[str]]] = {}
    with taddons.context() as tctx:
        tctx.master.addons.add(
            Quiet("quiet"), Records(calls, "first"), Parent(calls), Async(calls), Broken(),
            Records(calls, "after error"), Halts(calls), Records(calls, "after halt"),
        )

        async def both() -> None:
            for name, trigger_event in (("mitmproxy's", own), ("the sidecar's", fast)):
                calls.clear()
                caplog.clear()
                with caplog.at_level(logging.ERROR):
                    await trigger_event(tctx.master.addons, HttpRequestHook(tflow.tflow()))
                errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
                seen[name] = (list(calls), errors)

        asyncio.run(both())
    expected = (["first", "child", "async", "after error", "halt"], ["Addon error: boom"])
    assert seen == {"mitmproxy's": expected, "the sidecar's": expected}
    assert dispatch.install() and AddonManager.trigger_event is fast  # installed once
