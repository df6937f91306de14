"""mitmproxy's hook dispatch, without its cost for addons that have no handler.

For every hook of every flow, and for the `update` hook that follows each, mitmproxy's
`AddonManager.trigger_event` visits every addon in its chain (about 60 in mitmdump) and, for each,
creates a coroutine and a context manager before finding that the addon has no such method: some
290 visits per HTTP call, more CPU than the sidecar's own work per call (performance.md). The
replacement skips an addon that has neither the hook nor sub-addons before any of that; an addon
that may have a handler goes through mitmproxy's own path (`invoke_addon` under `safecall`), so the
order of handlers, the logging of their errors and `AddonHalt` are unchanged. Installed once, at
addon load, for the mitmproxy major version it was written against.
"""

from __future__ import annotations

import functools
from typing import Any

from .patching import wrap_once


def install() -> bool:
    """False when this mitmproxy's addon manager is not the one expected (nothing is changed then)."""
    try:
        from mitmproxy import exceptions, version
        from mitmproxy.addonmanager import AddonManager, safecall
    except ImportError:
        return False
    if not version.VERSION.startswith("12."):
        return False

    def wrap(original: Any) -> Any:
        @functools.wraps(original)  # __wrapped__: mitmproxy's own, for the test that compares them
        async def trigger_event(self: AddonManager, event: Any) -> None:
            name = event.name
            for addon in self.chain:
                if getattr(addon, name, None) is None and not hasattr(addon, "addons"):
                    continue  # what mitmproxy's own loop would find after a coroutine and a context manager
                try:
                    with safecall():
                        await self.invoke_addon(addon, event)
                except exceptions.AddonHalt:
                    return

        return trigger_event

    return wrap_once(AddonManager, "trigger_event", wrap)
