"""xtuner/mmengine glue: the only place that imports them (configs, train/test loops)."""
