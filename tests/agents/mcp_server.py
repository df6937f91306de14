"""An MCP server (the mcp SDK's MCPServer, Streamable HTTP) with one paid tool; every call is
written to a ledger file, so the books survive the server's restart between attempts.

Run: python mcp_server.py PORT LEDGER [--stateless]"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn
from mcp.server.mcpserver import MCPServer

port, ledger, stateless = int(sys.argv[1]), Path(sys.argv[2]), "--stateless" in sys.argv
server = MCPServer("paid-tools")


@server.tool()
def charge(amount: int) -> str:
    """Charge the customer `amount` dollars."""
    with ledger.open("a") as f:
        f.write(f"{amount}\n")
    return f"charged {amount} (tool call {len(ledger.read_text().splitlines())})"


if __name__ == "__main__":
    uvicorn.run(server.streamable_http_app(stateless_http=stateless), host="127.0.0.1", port=port, log_level="warning")
