#!/usr/bin/env python
"""Same as ``slidechat extract-features`` (works under ``torchrun``; see --help)."""

import sys

from slidechat.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["extract-features", *sys.argv[1:]]))
