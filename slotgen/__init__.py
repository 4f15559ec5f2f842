"""slotgen: long, consistent, story-driven video generation with object-centric KV memory.

Architecture (follow a chunk's K/V):

    storyboard.py          YAML → validated Storyboard → chunk plan (which prompt drives which chunk)
    engine/generator.py    the chunk loop: noise → few-step sampler → commit pass → decode → write
    engine/attention.py    per-layer self-attention processor: [memory K/V ; chunk K/V], RoPE at
                           engine-assigned positions; on the commit pass hands chunk K/V to memory
    memory/                policies behind one interface: window, sink (and later bank, slot)
    video/                 streaming causal VAE decode and MP4 / lossless writers (atomic)
    models/                the embedded miniature and local Wan checkpoints
"""

__version__ = "0.1.0"
