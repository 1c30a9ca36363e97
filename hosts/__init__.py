"""Hosts: thin layers that hand backend/ tensors and hook points (diffusers here; ComfyUI lives in nodes/)."""
