"""xtuner/mmengine glue: config loading and the runner, the training wrappers stock ``xtuner train``
builds, the SlideBench loop ``xtuner test`` runs, mmengine's safe checkpoint loading. The other
packages touch mmengine only where they handle a value it made (a lazy import, with the reason)."""
