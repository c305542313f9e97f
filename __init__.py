"""ComfyUI entry point: MAGNeT text-to-music / text-to-sound nodes (category audio/MAGNeT)."""
if __package__:   # loaded as a package (ComfyUI, tests/pack.py); pytest may import this file bare from the rootdir
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    # one markdown help page per node (docs/<NodeClassName>.md), served as /extensions/<folder>/docs/...
    WEB_DIRECTORY = "./nodes/web"

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
