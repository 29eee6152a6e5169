"""Model-level fusion algorithms that need data, gradients or new modules (AdaMerging, RegMean,
Fisher, WEMoE, SMILE, ...). Uses ``methods``, never ``io`` or ``engine``. Filled by later work."""
