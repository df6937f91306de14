"""durable-sidecar: a mitmproxy addon that makes an agent's HTTP calls crash-safe."""
