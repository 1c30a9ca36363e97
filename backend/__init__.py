"""Host-independent core: pure torch (+ kornia, safetensors). Hosts (ComfyUI nodes, the diffusers host) hand it
tensors and hook points; nothing here imports a host."""
