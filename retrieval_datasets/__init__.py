"""The datasets of ``--dataset`` in their published layouts, one module each, and their registry
(``registry.DATASETS``): ``base`` (the base class, ``RetrievalTask``, ``SplitOptions``), ``sampler`` (training
batches), ``mitstates``, ``fashion200k``, ``fashioniq``, ``css3d`` (with ``css3d_render``), ``cirr``, ``triplets``,
``synthetic`` (generated in the MIT-States layout). The top-level ``datasets`` module re-exports their public
names."""
