"""ComfyUI entry point: MAGNeT text-to-music / text-to-sound nodes (category audio/MAGNeT)."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
