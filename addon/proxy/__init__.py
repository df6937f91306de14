"""The mitmproxy side: the addon's hooks, the patches to mitmproxy's HTTP and WebSocket layers,
WebSocket conversations and upstream sessions, metrics.
"""
