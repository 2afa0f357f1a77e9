"""ShareLoRA for Axolotl: decoder layers whose representations are nearly the same share one set of LoRA
matrices.

YAML::

    plugins:
      - sharelora_plugin.ShareLoRAPlugin
    adapter: sharelora

The plugin class is imported lazily so that the pure parts (planning, the CLI's ``--matrix`` mode) do not
pay for importing Axolotl.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["ShareLoRAPlugin"]


def __getattr__(name: str):
    if name == "ShareLoRAPlugin":
        from sharelora_plugin.plugin import ShareLoRAPlugin

        return ShareLoRAPlugin
    raise AttributeError(f"module 'sharelora_plugin' has no attribute {name!r}")
