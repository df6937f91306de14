"""The script mitmproxy loads: `mitmdump -s addon/durable.py`.

mitmproxy puts this file's folder on sys.path, not the repository root, so the package is imported
from the installation (`pip install -e .`), or from the checkout next to this file as a fallback.
"""

import sys
from pathlib import Path

try:
    from addon.sidecar import DurableSidecar
except ImportError:  # running from a checkout that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from addon.sidecar import DurableSidecar

addons = [DurableSidecar()]
