"""What the real-tier drivers share (they run in ComfyUI's python): call a node as ComfyUI's executor does, catch the
message a node error shows in the UI, and collect the warnings ComfyUI logs (e.g. "lora key not loaded")."""
from __future__ import annotations

import logging


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def node_runner():
    """``run(node_id, **inputs)``: the node called as ComfyUI's executor calls it, inside torch.inference_mode()
    (execution.py), so loaded weights are inference tensors as in a real run."""
    import nodes
    import torch
    from comfy_api.internal import _ComfyNodeInternal, make_locked_method_func

    def run(node_id, **kwargs):
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        with torch.inference_mode():
            if issubclass(cls, _ComfyNodeInternal):
                return make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE({}))(**kwargs).result
            return getattr(cls(), cls.FUNCTION)(**kwargs)
    return run


def error_of(fn):
    """The message a node error shows in the UI, or None."""
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None
