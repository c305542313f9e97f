"""Import the repository as a ComfyUI custom-node package, the way ComfyUI does (a package named after
the folder, loaded from its __init__.py), without ComfyUI installed."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "magnet_node_pack"


def load_pack():
    if NAME in sys.modules:
        return sys.modules[NAME]
    spec = importlib.util.spec_from_file_location(NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = mod
    spec.loader.exec_module(mod)
    return mod


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def widget_inputs(cls):
    """[(name, type, options)] of a node's widget inputs, in the order ComfyUI saves widgets_values."""
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            typ, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(typ, list) or typ in WIDGET_TYPES:
                out.append((name, typ, opts))
    return out
