"""The world: a small procedurally generated universe in which tiny models of the real
architectures are trained on the CPU, so that the pipeline's methods can be seen working.

* :mod:`.concepts` — ID classes, near/far OOD kinds, attributes, the lexicon, the OOD sets (data);
* :mod:`.render`   — scenes -> 64x64 images, captions, descriptions (pure functions of a seed).

Stages reach the world only through the data-source registry (``data.id_source: world``, the
``world-*`` OOD sets), the ``world`` lexicon and ``world://`` model ids.
"""
