"""The script mitmproxy loads: `mitmdump -s addon/durable.py` (or `-s "$(durable addon-path)"`).

The package is `durable_sidecar`, installed from this folder (`pip install .`, or a wheel). From a
checkout that was never installed, this folder is loaded as that package.
"""

import importlib.util
import sys
from pathlib import Path

try:
    from durable_sidecar.proxy.sidecar import DurableSidecar
except ImportError:  # a checkout that was not installed: this folder is the package
    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location(
        "durable_sidecar", here / "__init__.py", submodule_search_locations=[str(here)]
    )
    assert spec is not None and spec.loader is not None
    sys.modules["durable_sidecar"] = package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)
    from durable_sidecar.proxy.sidecar import DurableSidecar

addons = [DurableSidecar()]
