"""ComfyUI entry point of the Mochi xDiT node pack.

ComfyUI imports this folder under whatever name the user gave it (it may contain "-"). Ray
workers must import the same code by a stable name, so the pack always runs as the package
``mochi_xdit``: loaded under another name, this file loads the folder again as ``mochi_xdit``
(``sys.modules`` only, nothing is added to ``sys.path``) and re-exports its node mappings.

Imported as ``mochi_xdit`` (the CLI, Ray workers, ``mochi_xdit.mochi``), the node mappings are
loaded only when asked for (PEP 562), so nothing outside ComfyUI imports the ComfyUI layer.
"""

import importlib.util
import os
import sys

CANONICAL_NAME = "mochi_xdit"

_NODE_EXPORTS = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")
# The frontend extension (web/): opens sampler nodes saved with an earlier widget layout by name.
WEB_DIRECTORY = "./web"

if __name__ == CANONICAL_NAME:

    def __getattr__(name: str):
        if name in _NODE_EXPORTS:
            from . import nodes

            return getattr(nodes, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

else:
    _here = os.path.dirname(os.path.realpath(__file__))
    _canonical = sys.modules.get(CANONICAL_NAME)
    if _canonical is None or os.path.dirname(os.path.realpath(_canonical.__file__)) != _here:
        _spec = importlib.util.spec_from_file_location(
            CANONICAL_NAME, os.path.join(_here, "__init__.py"), submodule_search_locations=[_here]
        )
        _canonical = importlib.util.module_from_spec(_spec)
        sys.modules[CANONICAL_NAME] = _canonical
        _spec.loader.exec_module(_canonical)
    NODE_CLASS_MAPPINGS = _canonical.NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = _canonical.NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
