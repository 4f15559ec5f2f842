"""slotgen: long, consistent, story-driven video generation with object-centric KV memory.

Follow a chunk's K/V: ``storyboard`` (YAML → validated Storyboard) → ``render`` (Renderer: storyboard +
model + memory policy) → ``engine.generator`` (noise → sampler → commit pass → decode) →
``engine.attention`` (``[memory K/V ; chunk K/V]``, RoPE at engine-assigned positions; the commit pass
hands the chunk's K/V to the policy) → ``memory`` (window, sink, bank, slot and plug-ins, one registry)
→ ``video`` (streaming causal VAE decode, MP4 / lossless writers). ``snapshot`` is the file format,
``resume`` continues a snapshot, ``cli`` is the command line. The README's "Layout" section lists
every module.
"""

__version__ = "0.1.0"
